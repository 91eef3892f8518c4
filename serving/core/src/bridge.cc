#include "bridge.h"

#include "call.h"
#include "core.h"
#include "errors.h"

namespace rnnserve {

BridgePool::BridgePool(int threads) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { loop(); });
}

BridgePool::~BridgePool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void BridgePool::post(std::function<void()> work) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    work_.push_back(std::move(work));
  }
  wake_.notify_one();
}

void BridgePool::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    wake_.wait(lock, [this] { return stopping_ || !work_.empty(); });
    if (work_.empty()) return;  // stopping, and every posted call was answered
    auto work = std::move(work_.front());
    work_.pop_front();
    lock.unlock();
    work();
    lock.lock();
  }
}

namespace {

// One bridged call: read the request, let Python answer it on a bridge thread, write the replies
// one at a time, finish. gRPC owns the reactor's life: it is deleted in OnDone.
class BridgeCall final : public grpc::ServerGenericBidiReactor {
 public:
  BridgeCall(Core* core, grpc::GenericCallbackServerContext* ctx)
      : core_(core), method_(ctx->method()), scope_(core, ctx, ctx->method(), /*admit_now=*/false) {
    if (scope_.refused()) {
      const grpc::Status status = scope_.refused()->kind == ErrorKind::kUnauthenticated
                                      ? plain_status(*scope_.refused())
                                      : rich_status(*scope_.refused());
      scope_.finish(status.error_code());
      Finish(status);
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Done(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the call carried no request message"));
      return;
    }
    std::vector<grpc::Slice> slices;
    std::string bytes;
    if (request_.Dump(&slices).ok()) {
      for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
    core_->bridge_pool().post([this, bytes = std::move(bytes)] {
      if (auto refused = scope_.admit()) return Done(rich_status(*refused));
      reply_ = core_->bridge()(method_, bytes, scope_.identity());
      if (!reply_.model.empty()) scope_.set_model(reply_.model);
      WriteNext();
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Done(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    WriteNext();
  }

  void OnDone() override { delete this; }

 private:
  void WriteNext() {
    if (next_ < reply_.messages.size()) {
      const std::string& m = reply_.messages[next_++];
      grpc::Slice slice(m.data(), m.size());
      out_ = grpc::ByteBuffer(&slice, 1);
      StartWrite(&out_);
      return;
    }
    Done(grpc::Status(static_cast<grpc::StatusCode>(reply_.code), reply_.message, reply_.details));
  }

  void Done(const grpc::Status& status) {
    scope_.finish(status.error_code());
    Finish(status);
  }

  Core* core_;
  const std::string method_;
  CallScope scope_;
  grpc::ByteBuffer request_, out_;
  BridgeReply reply_;
  size_t next_ = 0;
};

}  // namespace

grpc::ServerGenericBidiReactor* BridgeService::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new BridgeCall(core_, ctx);
}

}  // namespace rnnserve
