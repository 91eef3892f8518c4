// The generic bridge: every RPC the core does not serve natively (model listing, metadata,
// Predict, Generate, Triton's extensions) reaches Python as (method, request bytes) and comes back
// as reply messages or a status. Python calls run on a few bridge threads, never on gRPC's.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace rnnserve {

struct BridgeReply {
  int code = 0;                       // grpc::StatusCode
  std::string message;
  std::string details;                // serialized google.rpc.Status, or empty
  std::vector<std::string> messages;  // serialized replies, in order (one for unary)
  std::string model;                  // the model the call was about, for the access log ("" = none)
};

// Sends one reply of a server-streaming bridged call now (Generate's tokens as they come);
// false once the client is gone, so the handler can stop. Empty for calls that cannot stream.
using Emit = std::function<bool(std::string)>;

// (full method name "/pkg.Service/Method", serialized request, peer identity, emit) → reply;
// reply.messages are sent after anything emitted.
using Bridge =
    std::function<BridgeReply(const std::string&, const std::string&, const std::string&, const Emit&)>;

class BridgePool {
 public:
  explicit BridgePool(int threads);
  ~BridgePool();
  BridgePool(const BridgePool&) = delete;
  BridgePool& operator=(const BridgePool&) = delete;
  void post(std::function<void()> work);

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> work_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

class Core;
// Serves every method no typed service claims: hands it to the bridge.
class BridgeService final : public grpc::CallbackGenericService {
 public:
  explicit BridgeService(Core* core) : core_(core) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

 private:
  Core* core_;
};

}  // namespace rnnserve
