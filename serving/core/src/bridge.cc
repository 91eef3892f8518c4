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

// The door a handler's emit goes through: open while the handler runs, closed (under its lock)
// the moment it returns, so an emit kept past that never reaches a finished call.
struct Outbox {
  std::mutex mu;
  std::function<bool(std::string)> send;  // empty once closed

  bool emit(std::string message) {
    std::lock_guard<std::mutex> lock(mu);
    return send && send(std::move(message));
  }
  void close() {
    std::lock_guard<std::mutex> lock(mu);
    send = nullptr;
  }
};

// One bridged call: read the request, let Python answer it on a bridge thread, write its replies
// in order as they come (a streaming handler emits them while it runs), finish once the handler
// has returned and every reply is written. gRPC owns the reactor's life: it is deleted in OnDone,
// which cannot come before Finish, which waits for the handler.
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
      Returned(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the call carried no request message"));
      return;
    }
    std::vector<grpc::Slice> slices;
    std::string bytes;
    if (request_.Dump(&slices).ok()) {
      for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
    outbox_->send = [this](std::string message) { return Enqueue(std::move(message)); };
    core_->bridge_pool().post([this, bytes = std::move(bytes)] {
      if (auto refused = scope_.admit()) return Returned(rich_status(*refused));
      const auto outbox = outbox_;
      BridgeReply reply = core_->bridge()(method_, bytes, scope_.identity(),
                                          [outbox](std::string m) { return outbox->emit(std::move(m)); });
      if (!reply.model.empty()) scope_.set_model(reply.model);
      for (auto& m : reply.messages) Enqueue(std::move(m));
      Returned(grpc::Status(static_cast<grpc::StatusCode>(reply.code), reply.message, reply.details));
    });
  }

  void OnWriteDone(bool ok) override {
    Next next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) gone_ = true;  // the client went away: later replies are dropped
      next = Plan();
    }
    Act(next);
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    gone_ = true;
  }

  void OnDone() override { delete this; }

 private:
  enum class Next { kNothing, kWrite, kFinish };

  // Queues a reply; false once the client is gone.
  bool Enqueue(std::string message) {
    Next next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (gone_) return false;
      queue_.push_back(std::move(message));
      next = Plan();
    }
    Act(next);
    return true;
  }

  void Returned(grpc::Status status) {
    outbox_->close();  // waits for an emit in progress; none after this
    Next next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      final_ = std::move(status);
      returned_ = true;
      next = Plan();
    }
    Act(next);
  }

  // Under mu_: the next write (one in flight at a time), or the end once the handler returned and
  // nothing is left to write.
  Next Plan() {
    if (writing_ || finished_) return Next::kNothing;
    if (!gone_ && !queue_.empty()) {
      grpc::Slice slice(queue_.front().data(), queue_.front().size());
      queue_.pop_front();
      out_ = grpc::ByteBuffer(&slice, 1);
      writing_ = true;
      return Next::kWrite;
    }
    if (!returned_) return Next::kNothing;
    finished_ = true;
    if (gone_ && final_.ok()) final_ = grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    return Next::kFinish;
  }

  // Without mu_: once Finish is called the reactor may be deleted at any moment, so it is the
  // last thing this call does with it.
  void Act(Next next) {
    if (next == Next::kWrite) {
      StartWrite(&out_);
    } else if (next == Next::kFinish) {
      scope_.finish(final_.error_code());
      Finish(final_);
    }
  }

  Core* core_;
  const std::string method_;
  CallScope scope_;
  grpc::ByteBuffer request_, out_;
  std::shared_ptr<Outbox> outbox_ = std::make_shared<Outbox>();
  std::mutex mu_;
  std::deque<std::string> queue_;
  grpc::Status final_;
  bool writing_ = false, returned_ = false, finished_ = false, gone_ = false;
};

}  // namespace

grpc::ServerGenericBidiReactor* BridgeService::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new BridgeCall(core_, ctx);
}

}  // namespace rnnserve
