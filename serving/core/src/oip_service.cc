#include "oip_service.h"

#include <google/protobuf/descriptor.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <mutex>
#include <set>
#include <tuple>
#include <unordered_map>

#include "call.h"
#include "core.h"
#include "inference/grpc_service.grpc.pb.h"
#include "oip_codec.h"
#include "oip_stats.h"
#include "raw.h"
#include "text.h"

namespace rnnserve {

namespace inf = ::inference;
using namespace oip;  // NOLINT: this file is the OIP transport

namespace {

constexpr size_t kMaxInFlightPerStream = 1024;  // unanswered requests before a stream stops reading
constexpr uint64_t kMaxPaddedSteps = 16384;     // predict_batcher.MAX_PADDED_STEPS
constexpr const char* kInferMethod = "/inference.GRPCInferenceService/ModelInfer";
constexpr const char* kStreamMethod = "/inference.GRPCInferenceService/ModelStreamInfer";
constexpr const char* kStatisticsMethod = "/inference.GRPCInferenceService/ModelStatistics";
const char* const kNative[] = {"ModelInfer", "ModelStreamInfer", "ModelStatistics"};

// ---- models by name and version -------------------------------------------------------------------

// Core::model, for a version given as text: one past 32 bits is not loaded, in the same words.
Result<ModelPtr> find_model(Core* core, const std::string& name, const std::optional<std::string>& version,
                            Core::Newest newest) {
  if (!version) return core->model(name, 0, newest);
  if (version->size() <= 10 && std::stoull(*version) <= UINT32_MAX) {
    return core->model(name, static_cast<uint32_t>(std::stoull(*version)));
  }
  auto known = core->model(name, 0, Core::Newest::kLoaded);  // the unknown-model error comes first
  if (!known.ok()) return known.error();
  std::string have;
  for (const auto& m : core->models()) {
    if (m->name == name) have += (have.empty() ? "" : ", ") + std::to_string(m->version);
  }
  return Error::of(ErrorKind::kVersionNotFound,
                   "model " + py_repr(name) + " has no version " + *version + "; loaded: " + have);
}

// Empty name: every model; empty version: every version of the named model(s).
Result<std::vector<ModelPtr>> models_named(Core* core, const std::string& name, const std::string& version) {
  if (!name.empty() && !version.empty()) {
    auto v = parse_version(version);
    if (!v.ok()) return v.error();
    auto m = find_model(core, name, v.value(), Core::Newest::kLoaded);
    if (!m.ok()) return m.error();
    return std::vector<ModelPtr>{m.value()};
  }
  if (!name.empty()) {
    auto known = core->model(name, 0, Core::Newest::kLoaded);  // NOT_FOUND for an unknown name
    if (!known.ok()) return known.error();
  }
  if (!version.empty()) return Error::invalid("model statistics of a version need the model's name", "version");
  std::vector<ModelPtr> found;
  for (const auto& m : core->models()) {
    if (name.empty() || m->name == name) found.push_back(m);
  }
  std::sort(found.begin(), found.end(),
            [](const ModelPtr& a, const ModelPtr& b) { return std::tie(a->name, a->version) < std::tie(b->name, b->version); });
  return found;
}

// ---- one request, start to answer --------------------------------------------------------------

std::string bytes_of(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (buffer.Dump(&slices).ok()) {
    for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return bytes;
}

struct Call {  // a request, its bytes as they came (the bridge takes them unchanged), its caller
  inf::ModelInferRequest request;
  grpc::ByteBuffer bytes;
  std::string identity;
};
using CallPtr = std::shared_ptr<const Call>;

struct Answer {
  grpc::Status status;                // the request's error, message unclipped
  inf::ModelInferResponse response;  // when OK
};
using Answered = std::function<void(Answer)>;

Error not_open(const SequenceId& id, const std::string& model, const Error& err) {
  if (err.kind == ErrorKind::kSessionExpired) {
    return Error::of(err.kind, "sequence " + id.repr() + " of model " + py_repr(model) +
                                   " idled past the session TTL and expired; start it again with sequence_start=true");
  }
  if (err.kind == ErrorKind::kSessionNotFound) {
    return Error::of(err.kind, "sequence " + id.repr() + " of model " + py_repr(model) +
                                   " is not open (never started, or already ended): its first request must carry "
                                   "sequence_start=true");
  }
  return err;
}

// One ModelInferRequest → an Answer: decoded and checked here, stepped through the Stepper (a
// sequence's session, or a throwaway session per stateless row), or handed to the bridge.
class Inference : public std::enable_shared_from_this<Inference> {
 public:
  static void run(Core* core, Statistics* stats, CallPtr call, Answered done) {
    std::shared_ptr<Inference>(new Inference(core, stats, std::move(call), std::move(done)))->start();
  }

 private:
  Inference(Core* core, Statistics* stats, CallPtr call, Answered done)
      : core_(core), stats_(stats), call_(std::move(call)), done_(std::move(done)) {}

  const inf::ModelInferRequest& request() const { return call_->request; }

  void start() {
    if (auto err = prepare()) return fail(*err);
    if (!model_) return relay();
    if (control_.id) return step_sequence();
    rows_done_ = 0;
    y_.assign(rows_.size() * rows_[0].steps * static_cast<size_t>(model_->output_size), 0.0f);
    step_wave();
  }

  // Everything up to the point where the request can run; model_ stays empty for a request the
  // bridge answers (stateless, on a model that reads whole sequences).
  std::optional<Error> prepare() {
    auto control = sequence_control(request());
    if (!control.ok()) return control.error();
    control_ = control.value();
    auto version = parse_version(request().model_version());
    if (!version.ok()) return version.error();
    // an open sequence runs on its own version, ready or not: name one that is loaded
    const bool continues = control_.id && !control_.start;
    auto model = find_model(core_, request().model_name(), version.value(),
                            continues ? Core::Newest::kLoaded : Core::Newest::kReady);
    if (!model.ok()) return model.error();
    if (!continues) {  // new work: a ready version only
      if (auto err = core_->not_ready(*model.value())) return err;
    }
    if (!control_.id && !model.value()->streamable) {
      clock_.model = model.value();
      return std::nullopt;
    }
    if (control_.id) {
      if (auto err = sequence_model(model.value(), version.value())) return err;
    } else {
      model_ = model.value();
    }
    clock_.model = model_;
    auto wanted = requested_outputs(request(), *model_);
    if (!wanted.ok()) return wanted.error();
    wanted_ = std::move(wanted.value());
    auto rows = decode_rows(*model_, request());
    if (!rows.ok()) return rows.error();
    rows_ = std::move(rows.value());
    if (auto err = check_reply_size(request(), *model_, rows_, wanted_,
                                    static_cast<uint64_t>(core_->config().max_message_bytes))) {
      return err;
    }
    if (core_->stopping()) return core_->shutting_down();
    clock_.rows = rows_.size();
    clock_.decoded = now_ns();
    return std::nullopt;
  }

  // The model a sequence step runs on: the request's, or the open sequence's version.
  std::optional<Error> sequence_model(const ModelPtr& model, const std::optional<std::string>& version) {
    if (!model->streamable) {
      return Error::of(ErrorKind::kNotStreamable,
                       model->name + " reads whole sequences (bidirectional), so it has no stateful sequences: "
                                     "send the request without sequence_id for a stateless inference of the whole sequence");
    }
    model_ = model;
    if (control_.start) return std::nullopt;
    auto found = core_->session(session_id_for(call_->identity, request().model_name(), *control_.id));
    if (!found.ok()) return not_open(*control_.id, request().model_name(), found.error());
    session_ = found.value();
    const ModelSpec& running = *session_->model;
    if (version && *version != std::to_string(running.version)) {
      return Error::invalid("sequence " + control_.id->repr() + " runs on " + running.name + " version " +
                                std::to_string(running.version) + ", not " + *version,
                            "version");
    }
    model_ = session_->model;
    return std::nullopt;
  }

  // -- a sequence's step --
  void step_sequence() {
    if (rows_.size() != 1) {
      return fail(Error::invalid("a sequence request carries one row (batch 1), got " + std::to_string(rows_.size()) +
                                     ": send " + expected_inputs(*model_),
                                 "inputs"));
    }
    sid_ = session_id_for(call_->identity, model_->name, *control_.id);
    if (control_.start) {  // a start on an open sequence restarts it (as Triton does)
      core_->store().close(sid_);
      auto opened = core_->store().open(model_, sid_);
      if (!opened.ok() && opened.error().kind == ErrorKind::kSessionExists) return fail(start_lost());
      if (!opened.ok()) return fail(opened.error());
      if (auto err = core_->not_ready(*model_)) {  // retired meanwhile (see Core::open_session)
        core_->store().close_opening(*opened.value());
        return fail(*err);
      }
      session_ = opened.value();
    }
    auto self = shared_from_this();
    core_->stepper().step(session_,
                          PendingStep{rows_[0], control_.step_index, [self](StepOutcome o) { self->stepped(o); }});
  }

  void stepped(const StepOutcome& o) {
    const bool lost = !o.ok() && taken_away(o.error.kind) && session_->is_closed();
    // all or nothing: a failed first step leaves no sequence behind; an end closes exactly this
    // sequence, after its last step. This opening only: a retry of the start may have opened
    // the sequence again meanwhile, and that one goes on.
    if ((!o.ok() && control_.start) || (o.ok() && control_.end)) core_->store().close_opening(*session_);
    if (lost) return fail(control_.start ? start_lost() : sequence_gone(o.error));
    if (!o.ok()) return fail(in_oip_words(o.error));
    clock_.timed(*o.reply);
    answer(std::vector<float>(o.reply->y), 1, o.reply->steps);
  }

  // How a store answers a step whose session was closed under it (not a model or store fault).
  static bool taken_away(ErrorKind kind) {
    return kind == ErrorKind::kSessionNotFound || kind == ErrorKind::kSessionExpired ||
           kind == ErrorKind::kUnavailable;
  }

  // Another request of this sequence (a retry of this start, or an end) closed what this start
  // opened before its step was kept. The store's own words for it name the internal session id
  // and differ by the moment it happened (already open, closed while waiting, unknown, reopened).
  Error start_lost() const {
    return Error::of(ErrorKind::kUnavailable,
                     "sequence " + control_.id->repr() + " of model " + py_repr(model_->name) +
                         " was started again or ended by another request while this start ran; retry the start");
  }

  // The session this request found was closed under it, or its id opened again: the store's
  // words name the internal session id.
  Error sequence_gone(const Error& err) const {
    if (err.kind != ErrorKind::kUnavailable) return not_open(*control_.id, model_->name, err);
    return Error::of(ErrorKind::kUnavailable, "sequence " + control_.id->repr() + " of model " + py_repr(model_->name) +
                                                  " was started again (perhaps on another replica) while this request "
                                                  "ran; retry");
  }

  // The stepper names rnnserve.v1's field and the session; an OIP client sent
  // sequence_step_index for a sequence.
  Error in_oip_words(const Error& err) const {
    if (err.kind != ErrorKind::kStepOutOfOrder || !err.expected_index || !control_.step_index) return err;
    return Error::out_of_order("sequence_step_index", *control_.step_index,
                               "sequence " + control_.id->repr() + " of model " + py_repr(model_->name),
                               *err.expected_index);
  }

  // -- stateless rows: each from fresh state through a throwaway session that no store holds
  // (nothing to keep, so no store round trip), batched like any step; in waves of at most
  // kMaxPaddedSteps rows × steps (a batch's memory grows with rows × T) --
  void step_wave() {
    const size_t steps = rows_[0].steps, wave = std::max<size_t>(1, kMaxPaddedSteps / steps);
    const size_t first = rows_done_, last = std::min(rows_.size(), first + wave);
    outcomes_.assign(last - first, StepOutcome{});
    remaining_.store(static_cast<int>(last - first) + 1);  // +1: this loop's own hold
    auto self = shared_from_this();
    std::vector<Stepper::Call> calls;
    for (size_t i = first; i < last; ++i) {
      auto throwaway = std::make_shared<Session>("", model_);
      throwaway->transient = true;
      calls.push_back(Stepper::Call{throwaway, PendingStep{rows_[i], std::nullopt, [self, i, first](StepOutcome o) {
                                      self->outcomes_[i - first] = std::move(o);
                                      self->arrive();
                                    }}});
    }
    core_->stepper().step(std::move(calls));
    arrive();
  }

  void arrive() {
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) wave_done();
  }

  void wave_done() {
    const size_t per_row = rows_[0].steps * static_cast<size_t>(model_->output_size);
    for (size_t i = 0; i < outcomes_.size(); ++i) {
      if (!outcomes_[i].ok()) return fail(outcomes_[i].error);
      clock_.timed(*outcomes_[i].reply);
      std::copy(outcomes_[i].reply->y.begin(), outcomes_[i].reply->y.end(), y_.begin() + (rows_done_ + i) * per_row);
    }
    rows_done_ += outcomes_.size();
    if (rows_done_ < rows_.size()) return step_wave();
    answer(std::move(y_), static_cast<int64_t>(rows_.size()), rows_[0].steps);
  }

  // -- a stateless request of a model that reads whole sequences: Python's sequence graph --
  void relay() {
    auto self = shared_from_this();
    core_->bridge_pool().post([self] {
      self->clock_.decoded = now_ns();  // decoded by the bridge: its whole call counts as compute_infer
      BridgeReply reply = self->core_->bridge()(kInferMethod, bytes_of(self->call_->bytes), self->call_->identity, Emit{});
      self->clock_.computed = now_ns();
      Answer a;
      if (reply.code != 0) {
        a.status = grpc::Status(static_cast<grpc::StatusCode>(reply.code), reply.message, reply.details);
      } else if (reply.messages.empty() || !a.response.ParseFromString(reply.messages[0])) {
        a.status = grpc::Status(grpc::StatusCode::INTERNAL, "internal error: the bridge answered no ModelInferResponse");
      }
      self->finish(std::move(a));
    });
  }

  void answer(std::vector<float> y, int64_t rows, int64_t steps) {
    clock_.computed = now_ns();
    Answer a;
    a.response.set_model_name(model_->name);
    a.response.set_model_version(std::to_string(model_->version));
    a.response.set_id(request().id());
    fill_outputs(*model_, std::move(y), rows, steps, wanted_, &a.response);
    finish(std::move(a));
  }

  void fail(const Error& err) { finish(Answer{grpc::Status(grpc_code(err.kind), err.message), {}}); }

  void finish(Answer a) {
    if (!a.status.ok()) {
      stats_->failed(clock_);
    } else {
      if (!model_) clock_.rows = bridged_rows(request());
      stats_->succeeded(clock_);
    }
    done_(std::move(a));
  }

  // The rows of a request the bridge answered (it checked them): one text, or the batch dim.
  static uint64_t bridged_rows(const inf::ModelInferRequest& r) {
    const auto& t = r.inputs(0);
    return t.datatype() == "BYTES" ? 1 : static_cast<uint64_t>(t.shape(0));
  }

  Core* const core_;
  Statistics* const stats_;
  const CallPtr call_;
  const Answered done_;
  Clock clock_;
  SequenceControl control_;
  ModelPtr model_;
  std::vector<Wanted> wanted_;
  Rows rows_;
  SessionPtr session_;
  std::string sid_;
  // stateless
  size_t rows_done_ = 0;
  std::vector<float> y_;  // (B, T, O)
  std::vector<StepOutcome> outcomes_;
  std::atomic<int> remaining_{0};
};

// ---- wire ---------------------------------------------------------------------------------------

// The bytes as a request, or nothing when they do not parse.
CallPtr parsed_call(const grpc::ByteBuffer& buffer, const std::string& identity) {
  auto call = std::make_shared<Call>();
  if (!parse(buffer, &call->request)) return nullptr;
  call->bytes = buffer;  // shares the slices
  call->identity = identity;
  return call;
}

// The OIP answers plain statuses, as Triton does, clipped as rnnserve.v1's.
grpc::Status oip_status(const Error& err) { return grpc::Status(grpc_code(err.kind), clipped(err.message)); }

const grpc::Status& malformed_request() {
  static const grpc::Status status = oip_status(malformed(inf::ModelInferRequest::default_instance()));
  return status;
}

// A stream's reply: the response, or the error as "[CODE] message" with the request's names.
inf::ModelStreamInferResponse stream_reply(const inf::ModelInferRequest& request, Answer a) {
  inf::ModelStreamInferResponse reply;
  if (a.status.ok()) {
    reply.mutable_infer_response()->Swap(&a.response);
    return reply;
  }
  reply.set_error_message("[" + std::string(code_name(a.status.error_code())) + "] " + a.status.error_message());
  auto* r = reply.mutable_infer_response();
  r->set_model_name(request.model_name());
  r->set_model_version(request.model_version());
  r->set_id(request.id());
  return reply;
}

// ---- ModelStreamInfer: one reply per request, in request order --------------------------------
//
// Requests of different sequences run concurrently (so the scheduler batches them); requests of
// one sequence run one after another in arrival order, start and end included (a chain per
// sequence key). A bad request gets an error reply and the stream goes on; a message that does
// not parse ends it with INVALID_ARGUMENT once the requests before it are answered. Past
// kMaxInFlightPerStream unanswered requests the stream stops reading until replies drain.

class InferStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  InferStream(Core* core, Statistics* stats, grpc::CallbackServerContext* ctx)
      : core_(core), stats_(stats), scope_(core, ctx, kStreamMethod) {
    if (scope_.refused()) {
      const grpc::Status status = oip_status(*scope_.refused());
      scope_.finish(status.error_code());
      Finish(status);
      return;
    }
    Read();
  }

  void OnReadDone(bool ok) override {
    CallPtr call = ok ? parsed_call(request_, scope_.identity()) : nullptr;
    std::unique_lock<std::mutex> lock(mu_);
    reading_ = false;
    if (!call) {  // the client half-closed (or went away), or the bytes are not a request
      closed_ = true;
      if (ok) end_ = malformed_request();
      return WriteOrFinish(lock);
    }
    const size_t slot = base_ + slots_.size();
    slots_.emplace_back();  // unanswered: the stream cannot finish before Run answers it
    const std::string key = sequence_key(scope_.identity(), call->request);
    if (slot == 0) scope_.set_model(call->request.model_name());  // the access log's model
    bool run_now = key.empty();
    if (!run_now) {
      auto& chain = chains_[key];
      chain.push_back({slot, call});
      run_now = chain.size() == 1;  // otherwise it runs when the one before it answers
    }
    const bool more = slots_.size() < kMaxInFlightPerStream;
    reading_ = more;
    lock.unlock();
    if (more) StartRead(&request_);
    if (run_now) Run(slot, call, key);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) broken_ = true;  // the client went away: what still runs finishes unwritten
    const bool resume = !reading_ && !closed_ && !broken_ && slots_.size() < kMaxInFlightPerStream;
    if (resume) reading_ = true;  // and so the stream cannot finish before the read is back
    WriteOrFinish(lock);
    if (resume) StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  struct Queued {
    size_t slot;
    CallPtr call;
  };

  void Read() {
    reading_ = true;
    StartRead(&request_);
  }

  void Run(size_t slot, const CallPtr& call, const std::string& key) {
    Inference::run(core_, stats_, call, [this, slot, call, key](Answer a) {
      Deliver(slot, key, serialize(stream_reply(call->request, std::move(a))));
    });
  }

  // Nothing touches `this` after WriteOrFinish unless a request is still unanswered (the next
  // of this sequence), which keeps the stream from finishing.
  void Deliver(size_t slot, const std::string& key, grpc::ByteBuffer reply) {
    std::optional<Queued> next;
    std::unique_lock<std::mutex> lock(mu_);
    slots_[slot - base_] = std::move(reply);
    if (!key.empty()) {
      auto chain = chains_.find(key);
      chain->second.pop_front();
      if (chain->second.empty()) {
        chains_.erase(chain);
      } else {
        next = chain->second.front();
      }
    }
    WriteOrFinish(lock);
    if (next) Run(next->slot, next->call, key);
  }

  // One write at a time, the oldest reply first; the status once every reply is out. Releases
  // the lock (gRPC's Start*/Finish are never called holding it).
  void WriteOrFinish(std::unique_lock<std::mutex>& lock) {
    while (broken_ && !slots_.empty() && slots_.front()) Pop();
    if (!writing_ && !broken_ && !slots_.empty() && slots_.front()) {
      out_ = std::move(*slots_.front());
      Pop();
      writing_ = true;
      lock.unlock();
      StartWrite(&out_);
      return;
    }
    if (finished_ || reading_ || writing_ || !slots_.empty() || !(closed_ || broken_)) return lock.unlock();
    finished_ = true;
    const grpc::Status status = broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "the client went away") : end_;
    lock.unlock();
    scope_.finish(status.error_code());
    Finish(status);
  }

  void Pop() {
    slots_.pop_front();
    ++base_;
  }

  Core* const core_;
  Statistics* const stats_;
  CallScope scope_;  // authentication, admission, and the count and access-log line at the end
  grpc::ByteBuffer request_, out_;
  std::mutex mu_;  // guards everything below
  std::deque<std::optional<grpc::ByteBuffer>> slots_;  // replies owed, in request order
  size_t base_ = 0;                                     // the request number of slots_.front()
  std::unordered_map<std::string, std::deque<Queued>> chains_;  // front: the one running
  bool reading_ = false, writing_ = false, closed_ = false, broken_ = false, finished_ = false;
  grpc::Status end_;  // OK, or why the stream ends (a message that did not parse)
};

// ---- the service --------------------------------------------------------------------------------

using Base = inf::GRPCInferenceService::WithRawCallbackMethod_ModelInfer<
    inf::GRPCInferenceService::WithRawCallbackMethod_ModelStreamInfer<
        inf::GRPCInferenceService::WithRawCallbackMethod_ModelStatistics<inf::GRPCInferenceService::Service>>>;

class OipService final : public Base {
 public:
  explicit OipService(Core* core) : core_(core) {
    const auto* d = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
        inf::GRPCInferenceService::service_full_name());
    const std::set<std::string> native(std::begin(kNative), std::end(kNative));
    for (int i = 0; i < d->method_count(); ++i) {
      if (!native.count(d->method(i)->name())) MarkMethodGeneric(i);  // served by the bridge
    }
  }

  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override {
    auto* reactor = ctx->DefaultReactor();
    auto scope = std::make_shared<CallScope>(core_, ctx, kInferMethod);  // lives until the answer
    if (scope->refused()) return finish(reactor, *scope, oip_status(*scope->refused()));
    CallPtr call = parsed_call(*request, scope->identity());
    if (!call) return finish(reactor, *scope, malformed_request());
    scope->set_model(call->request.model_name());
    Inference::run(core_, &stats_, call, [reactor, response, scope](Answer a) {
      const grpc::Status& s = a.status;
      if (!s.ok()) {
        finish(reactor, *scope, grpc::Status(s.error_code(), clipped(s.error_message()), s.error_details()));
        return;
      }
      grpc::ByteBuffer reply = serialize(a.response);
      response->Swap(&reply);
      finish(reactor, *scope, s);
    });
    return reactor;
  }

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ModelStreamInfer(grpc::CallbackServerContext* ctx) override {
    return new InferStream(core_, &stats_, ctx);
  }

  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                            grpc::ByteBuffer* response) override {
    auto* reactor = ctx->DefaultReactor();
    CallScope scope(core_, ctx, kStatisticsMethod);
    if (scope.refused()) return finish(reactor, scope, oip_status(*scope.refused()));
    inf::ModelStatisticsRequest req;
    if (!parse(*request, &req)) return finish(reactor, scope, oip_status(malformed(req)));
    scope.set_model(req.name().empty() ? "-" : req.name());
    auto models = models_named(core_, req.name(), req.version());
    if (!models.ok()) return finish(reactor, scope, oip_status(models.error()));
    inf::ModelStatisticsResponse reply;
    for (const auto& m : models.value()) fill_statistics(*m, stats_.snapshot(*m), core_->metrics().model(m->name).batches.load(), reply.add_model_stats());
    grpc::ByteBuffer bytes = serialize(reply);
    response->Swap(&bytes);
    return finish(reactor, scope, grpc::Status::OK);
  }

 private:
  static grpc::ServerUnaryReactor* finish(grpc::ServerUnaryReactor* reactor, CallScope& scope,
                                          const grpc::Status& status) {
    scope.finish(status.error_code());
    reactor->Finish(status);
    return reactor;
  }

  Core* core_;
  Statistics stats_;
};

}  // namespace

std::unique_ptr<grpc::Service> make_oip_service(Core* core) { return std::make_unique<OipService>(core); }

}  // namespace rnnserve
