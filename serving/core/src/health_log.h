// The access-log line for health checks: gRPC's own health service answers them, outside every
// CallScope, so a server interceptor (installed only while the access log is on) writes theirs.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <vector>

namespace rnnserve {

class Core;
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> health_log_interceptors(Core* core);

}  // namespace rnnserve
