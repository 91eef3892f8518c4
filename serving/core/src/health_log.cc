#include "health_log.h"

#include <string>

#include "call.h"
#include "core.h"

namespace rnnserve {

namespace {

using grpc::experimental::InterceptionHookPoints;

class HealthLog final : public grpc::experimental::Interceptor {
 public:
  HealthLog(Core* core, const char* method) : core_(core), method_(method), started_ns_(now_ns()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      access_log_line(*core_, method_, "-", methods->GetSendStatus().error_code(), started_ns_);
    }
    methods->Proceed();
  }

 private:
  Core* core_;
  std::string method_;
  int64_t started_ns_;
};

class HealthLogFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit HealthLogFactory(Core* core) : core_(core) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    if (std::string(info->method()).rfind("/grpc.health.v1.Health/", 0) != 0) return nullptr;
    return new HealthLog(core_, info->method());  // gRPC owns it for the call's life
  }

 private:
  Core* core_;
};

}  // namespace

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> health_log_interceptors(Core* core) {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> out;
  out.push_back(std::make_unique<HealthLogFactory>(core));
  return out;
}

}  // namespace rnnserve
