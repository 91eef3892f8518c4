#include "rnnserve_service.h"

#include <google/protobuf/descriptor.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <set>

#include "call.h"
#include "core.h"
#include "raw.h"
#include "replies.h"
#include "session_transfer.h"
#include "rnnserve/v1/rnnserve.grpc.pb.h"
#include "text.h"

namespace rnnserve {

namespace pb = ::rnnserve::v1;

namespace {

constexpr int kMaxStepManyEntries = 4096;
const char* const kBridged[] = {"ListModels", "GetModel", "Generate", "Predict"};

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Only ids this API issued: another transport's ids (OIP's "oip:<model>:<sequence>") are
// guessable by design, so from here they do not exist.
Result<SessionPtr> own_session(Core* core, const std::string& id) {
  if (id.find(':') != std::string::npos) {
    return Error::of(ErrorKind::kSessionNotFound, "unknown session " + py_repr(utf8_prefix(id, 64)));
  }
  return core->session(id);
}

constexpr size_t kEntryErrorBytes = 256;  // a StepMany entry's error, as a reply's size bound counts it

// Upper bound of one time step's Output (and its share of the reply's text) in a reply, framing
// included (grpc_api.output_bytes_per_step).
size_t output_bytes_per_step(const ModelSpec& m, uint32_t top_k) {
  const size_t floats = 4 * static_cast<size_t>(m.output_size) + 6;
  if (m.output_kind == OutputKind::kRegression) return 6 + 2 * floats;
  size_t longest = 0;
  for (const auto& label : m.labels) longest = std::max(longest, label.size());
  const size_t named = longest + 3 + 6;
  if (m.output_kind == OutputKind::kClassification) return 6 + floats + named + 4 * m.labels.size() + 6;
  const size_t candidates = std::min<size_t>(top_k ? top_k : kDefaultTopK, m.labels.size());
  return 6 + floats + named + candidates * (longest + 3 + 6 + 5 + 3) + longest;
}

// gRPC checks a reply's size only once it is built, when the sessions have moved on: refuse a
// message whose reply could exceed it before any step runs.
std::optional<Error> reply_too_large(size_t estimate, size_t limit) {
  if (estimate <= limit) return std::nullopt;
  return Error::too_large("the reply to this StepMany message would take up to " + std::to_string(estimate) +
                              " bytes; the limit is " + std::to_string(limit) +
                              " bytes: send fewer sessions or time steps per message",
                          "steps");
}

std::optional<uint64_t> wanted(const pb::StepRequest& r) {
  return r.has_step_index() ? std::optional<uint64_t>(r.step_index()) : std::nullopt;
}

uint32_t top_k(const pb::StepRequest& r) { return r.top_k() ? r.top_k() : kDefaultTopK; }

void fill_step(Core* core, const Session& s, const std::string& id, const Reply& r, uint32_t k,
               pb::StepResponse* reply) {
  reply->set_session_id(id);
  reply->set_step_index(r.step_index);
  reply->set_expires_at(core->expires_at(s));
  fill_reply(*s.model, r, k, reply);
}

// A Step or Session request checked up to the point where it can queue.
Result<Stepper::Call> prepare(Core* core, const std::string& id, const pb::StepRequest& req,
                              CallScope* scope = nullptr) {
  if (core->stopping()) return core->shutting_down();
  auto found = own_session(core, id);
  if (!found.ok()) return found.error();
  if (scope) scope->set_model(found.value()->model->name);
  auto input = decode_input(*found.value()->model, req.input());
  if (!input.ok()) return input.error();
  return Stepper::Call{found.value(), PendingStep{std::move(input.value()), wanted(req), nullptr}};
}

constexpr char kService[] = "/rnnserve.v1.RnnServe/";

grpc::ServerUnaryReactor* finish(grpc::CallbackServerContext* ctx, CallScope& scope, const grpc::Status& status) {
  scope.finish(status.error_code());
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

void fill_session(const SessionView& v, pb::SessionInfo* out) {
  out->set_session_id(v.session_id);
  out->set_model(v.model);
  out->set_version(v.version);
  out->set_expires_at(v.expires_at);
  out->set_next_step_index(v.next_step_index);
}

// ---- the two streams' common life: read, parse, handle, write, read again ----------------------

using RawStream = grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>;

template <class Request>
class Stream : public RawStream {
 public:
  void OnReadDone(bool ok) override {
    if (!ok) return Done(grpc::Status::OK);  // the client half-closed; every request was answered
    if (!parse(in_, &request_)) return Fail(malformed(request_));
    Handle();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return Done(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    StartRead(&in_);
  }

  void OnDone() override { delete this; }

 protected:
  Stream(Core* core, grpc::CallbackServerContext* ctx, const char* method)
      : core_(core), scope_(core, ctx, std::string(kService) + method) {}
  // Called last by the derived constructor: a read may complete on another thread at once, and
  // Handle() must find the whole object built.
  void Start() {
    if (scope_.refused()) return Fail(*scope_.refused());
    StartRead(&in_);
  }
  virtual void Handle() = 0;  // request_ holds the next message
  template <class Reply>
  void Write(const Reply& reply) {
    out_ = serialize(reply);
    StartWrite(&out_);
  }
  void Fail(const Error& err) { Done(rich_status(err)); }
  void Done(const grpc::Status& status) {
    scope_.finish(status.error_code());
    Finish(status);
  }

  Core* core_;
  CallScope scope_;
  grpc::ByteBuffer in_, out_;
  Request request_;
};

// ---- Session: one session per stream, one reply per request, in order ---------------------------

class SessionStream final : public Stream<pb::StepRequest> {
 public:
  SessionStream(Core* core, grpc::CallbackServerContext* ctx) : Stream(core, ctx, "Session") { Start(); }

 private:
  void Handle() override {
    if (session_id_.empty()) {
      session_id_ = request_.session_id();
      if (session_id_.empty()) return Fail(Error::invalid("the first message must name the session", "session_id"));
    } else if (!request_.session_id().empty() && request_.session_id() != session_id_) {
      return Fail(Error::invalid("one session per stream: this stream is " + py_repr(session_id_), "session_id"));
    }
    auto call = prepare(core_, session_id_, request_, &scope_);
    if (!call.ok()) return Fail(call.error());
    SessionPtr session = call.value().session;
    call.value().step.done = [this, session](StepOutcome o) {
      if (!o.ok()) return Fail(o.error);
      reply_.Clear();
      fill_step(core_, *session, session_id_, *o.reply, top_k(request_), &reply_);
      Write(reply_);
    };
    core_->stepper().step(std::move(call.value().session), std::move(call.value().step));
  }

  std::string session_id_;
  pb::StepResponse reply_;
};

// ---- StepMany: many sessions per message; a result or an error per entry ------------------------

class StepManyStream final : public Stream<pb::StepManyRequest> {
 public:
  StepManyStream(Core* core, grpc::CallbackServerContext* ctx) : Stream(core, ctx, "StepMany") { Start(); }

 private:
  void Handle() override {
    reply_.Clear();
    if (request_.has_packed()) return StepPacked();
    StepEntries();
  }

  // -- the `steps` form --
  void StepEntries() {
    const int n = request_.steps_size();
    if (n > kMaxStepManyEntries) {
      return Fail(Error::too_large(std::to_string(n) + " entries in one StepMany message; at most " +
                                       std::to_string(kMaxStepManyEntries),
                                   "steps"));
    }
    outcomes_.assign(static_cast<size_t>(n), StepOutcome{});
    entry_models_.assign(static_cast<size_t>(n), nullptr);
    expires_at_ = unix_now() + core_->store().ttl_s();
    remaining_.store(n + 1);  // +1: this loop's own hold, so no answer completes the message early
    std::vector<Stepper::Call> calls;
    std::vector<std::optional<Error>> early(static_cast<size_t>(n));
    size_t estimate = 0;
    for (int i = 0; i < n; ++i) {
      const auto& req = request_.steps(i);
      estimate += 2 * req.session_id().size() + 32;
      auto call = prepare(core_, req.session_id(), req);
      if (!call.ok()) {
        early[static_cast<size_t>(i)] = call.error();
        estimate += kEntryErrorBytes;
        continue;
      }
      estimate += call.value().step.input.steps * output_bytes_per_step(*call.value().session->model, req.top_k());
      entry_models_[static_cast<size_t>(i)] = call.value().session->model;
      call.value().step.done = [this, i](StepOutcome o) { Record(static_cast<size_t>(i), std::move(o)); };
      calls.push_back(std::move(call.value()));
    }
    if (auto err = reply_too_large(estimate, static_cast<size_t>(core_->config().max_message_bytes))) {
      return Fail(*err);
    }
    for (int i = 0; i < n; ++i) {
      if (early[static_cast<size_t>(i)]) Record(static_cast<size_t>(i), StepOutcome{nullptr, *early[static_cast<size_t>(i)]});
    }
    core_->stepper().step(std::move(calls));
    Arrive();
  }

  void Record(size_t i, StepOutcome o) {
    outcomes_[i] = std::move(o);
    Arrive();
  }

  void Arrive() {
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) AnswerEntries();
  }

  void AnswerEntries() {
    for (int i = 0; i < request_.steps_size(); ++i) {
      const auto& req = request_.steps(i);
      const auto& o = outcomes_[static_cast<size_t>(i)];
      auto* result = reply_.add_results();
      result->set_session_id(req.session_id());
      if (!o.ok()) {
        core_->metrics().request("StepMany.entry", code_name(grpc_code(o.error.kind)));
        *result->mutable_error() = error_message(o.error);
        continue;
      }
      auto* step = result->mutable_reply();
      step->set_session_id(req.session_id());
      step->set_step_index(o.reply->step_index);
      step->set_expires_at(expires_at_);
      fill_reply(*entry_models_[static_cast<size_t>(i)], *o.reply, top_k(req), step);
    }
    Write(reply_);
  }

  // -- the packed form --
  void StepPacked();
  std::optional<Error> CheckBlock(const pb::PackedSteps& p, const ModelSpec& m, uint32_t steps);
  std::optional<Error> EntryProblem(const ModelSpec& block, const Session& s, size_t pos) const;
  void AnswerPacked();

  pb::StepManyResponse reply_;
  std::vector<StepOutcome> outcomes_;
  std::vector<ModelPtr> entry_models_;
  std::atomic<int> remaining_{0};
  double expires_at_ = 0;
  // packed
  ModelPtr block_model_;
  uint32_t block_steps_ = 0;
  std::shared_ptr<const std::vector<float>> block_features_;
  std::shared_ptr<const std::vector<int64_t>> block_ids_;
  bool any_found_ = false;
};

std::optional<Error> StepManyStream::CheckBlock(const pb::PackedSteps& p, const ModelSpec& m, uint32_t steps) {
  const size_t n = static_cast<size_t>(p.session_ids_size());
  if (!m.streamable) {
    return Error::of(ErrorKind::kNotStreamable,
                     m.name + " is not streamable (it reads whole sequences, e.g. bidirectional): "
                              "use Predict with the whole sequence instead of sessions/StepMany");
  }
  if (p.step_indexes_size() != 0 && static_cast<size_t>(p.step_indexes_size()) != n) {
    return Error::invalid(std::to_string(p.step_indexes_size()) + " step_indexes for " + std::to_string(n) +
                              " sessions: send none or one per session",
                          "packed.step_indexes");
  }
  if (steps > m.max_steps) {
    return Error::invalid(std::to_string(steps) + " time steps per session; " + m.name + " accepts at most " +
                              std::to_string(m.max_steps),
                          "packed.steps");
  }
  if (m.tokens) {
    if (!p.features().empty()) return Error::invalid(m.name + " takes tokens, not features", "packed.features");
    if (static_cast<size_t>(p.tokens_size()) != n * steps) {
      return Error::invalid("packed.tokens holds " + std::to_string(p.tokens_size()) + " ids; " + std::to_string(n) +
                                " sessions x " + std::to_string(steps) + " steps are " + std::to_string(n * steps),
                            "packed.tokens");
    }
    return std::nullopt;
  }
  if (p.tokens_size()) return Error::invalid(m.name + " takes features, not tokens", "packed.tokens");
  const size_t expected = n * steps * static_cast<size_t>(m.features) * sizeof(float);
  if (p.features().size() != expected) {
    return Error::invalid("packed.features holds " + std::to_string(p.features().size()) + " bytes; " +
                              std::to_string(n) + " sessions x " + std::to_string(steps) + " steps x " +
                              std::to_string(m.features) + " features of float32 are " +
                              std::to_string(expected) + " bytes",
                          "packed.features");
  }
  return std::nullopt;
}

std::optional<Error> StepManyStream::EntryProblem(const ModelSpec& block, const Session& s, size_t pos) const {
  const ModelSpec& m = *s.model;
  if (m.name != block.name) {
    return Error::invalid("the session belongs to model " + py_repr(m.name) + ", not " + py_repr(block.name),
                          "packed.session_ids");
  }
  if (!m.same_io(block)) {
    return Error::invalid("the session runs " + m.name + " version " + std::to_string(m.version) +
                              ", whose inputs/outputs differ from version " + std::to_string(block.version) +
                              "'s; step it with `steps`",
                          "packed.session_ids");
  }
  const size_t row = block_steps_ * static_cast<size_t>(block.tokens ? 1 : block.features);
  if (block.tokens) {
    const int64_t* ids = block_ids_->data() + pos * row;
    const auto size = static_cast<int64_t>(block.vocab.size());
    for (size_t i = 0; i < row; ++i) {
      if (ids[i] < 0 || ids[i] >= size) {
        return Error::invalid("entry " + std::to_string(pos) + ": a token is outside the vocabulary [0, " +
                                  std::to_string(size) + ")",
                              "packed.tokens");
      }
    }
  } else if (!all_finite(block_features_->data() + pos * row, row)) {
    return Error::invalid("entry " + std::to_string(pos) + ": inputs contain NaN or Inf", "packed.features");
  }
  return std::nullopt;
}

void StepManyStream::StepPacked() {
  const auto& p = request_.packed();
  if (request_.steps_size()) return Fail(Error::invalid("a StepMany message carries `steps` or `packed`, not both", "packed"));
  const int n = p.session_ids_size();
  if (n > kMaxStepManyEntries) {
    return Fail(Error::too_large(std::to_string(n) + " sessions in one packed StepMany block; at most " +
                                     std::to_string(kMaxStepManyEntries),
                                 "packed.session_ids"));
  }
  // the block's shapes: every entry's session runs on its own version (EntryProblem checks it),
  // so a block keeps stepping the sessions of a model whose versions are all unloading
  auto m = core_->model(p.model(), 0, Core::Newest::kLoaded);
  if (!m.ok()) return Fail(m.error());
  block_model_ = m.value();
  scope_.set_model(block_model_->name);
  block_steps_ = p.steps() ? p.steps() : 1;
  if (auto err = CheckBlock(p, *block_model_, block_steps_)) return Fail(*err);
  const ModelSpec& bm = *block_model_;
  const size_t per_step = 4 * static_cast<size_t>(bm.output_size) +
                          (bm.output_kind == OutputKind::kRegression ? 0 : 4 * bm.labels.size() + 5);
  const size_t estimate = static_cast<size_t>(n) * block_steps_ * per_step + static_cast<size_t>(n) * 10 + 64;
  if (auto err = reply_too_large(estimate, static_cast<size_t>(core_->config().max_message_bytes))) {
    return Fail(*err);
  }
  if (block_model_->tokens) {
    block_ids_ = std::make_shared<const std::vector<int64_t>>(p.tokens().begin(), p.tokens().end());
  } else {
    std::vector<float> values(p.features().size() / sizeof(float));
    if (!values.empty()) std::memcpy(values.data(), p.features().data(), p.features().size());  // little-endian hosts
    block_features_ = std::make_shared<const std::vector<float>>(std::move(values));
  }
  outcomes_.assign(static_cast<size_t>(n), StepOutcome{});
  any_found_ = false;
  remaining_.store(n + 1);
  const size_t row = block_steps_ * static_cast<size_t>(block_model_->tokens ? 1 : block_model_->features);
  std::vector<Stepper::Call> calls;
  for (int i = 0; i < n; ++i) {
    const auto pos = static_cast<size_t>(i);
    if (core_->stopping()) {
      outcomes_[pos].error = core_->shutting_down();
      Arrive();
      continue;
    }
    auto found = own_session(core_, p.session_ids(i));
    std::optional<Error> problem = found.ok() ? EntryProblem(*block_model_, *found.value(), pos) : found.error();
    if (problem) {
      outcomes_[pos].error = *problem;
      Arrive();
      continue;
    }
    any_found_ = true;
    StepInput input{block_features_, block_ids_, pos * row, block_steps_};
    std::optional<uint64_t> want;
    if (p.step_indexes_size()) want = p.step_indexes(i);
    calls.push_back(Stepper::Call{found.value(), PendingStep{std::move(input), want, [this, pos](StepOutcome o) {
      if (o.ok() && o.reply->steps != block_steps_) {  // a cached retry of another length
        o = StepOutcome{nullptr, Error::invalid("step_index " + std::to_string(o.reply->step_index) +
                                                    " was answered with " + std::to_string(o.reply->steps) +
                                                    " time steps; this block carries " + std::to_string(block_steps_),
                                                "packed.steps")};
      }
      outcomes_[pos] = std::move(o);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) AnswerPacked();
    }}});
  }
  core_->stepper().step(std::move(calls));
  if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) AnswerPacked();
}

void StepManyStream::AnswerPacked() {
  const ModelSpec& m = *block_model_;
  const size_t n = outcomes_.size(), t = block_steps_, o = static_cast<size_t>(m.output_size);
  const size_t k = static_cast<size_t>(m.prob_size());
  std::vector<float> raw(n * t * o, 0.0f), probs(n * t * k, 0.0f);
  auto* out = reply_.mutable_packed();
  for (size_t i = 0; i < n; ++i) {
    const auto& r = outcomes_[i];
    if (!r.ok()) {
      out->add_step_indexes(0);
      auto* e = out->add_errors();
      e->set_position(static_cast<uint32_t>(i));
      core_->metrics().request("StepMany.entry", code_name(grpc_code(r.error.kind)));
      *e->mutable_error() = error_message(r.error);
      continue;
    }
    out->add_step_indexes(r.reply->step_index);
    std::memcpy(&raw[i * t * o], r.reply->y.data(), t * o * sizeof(float));
    if (k) {
      for (size_t s = 0; s < t; ++s) probabilities(m, &raw[(i * t + s) * o], &probs[(i * t + s) * k]);
    }
  }
  out->set_raw(reinterpret_cast<const char*>(raw.data()), raw.size() * sizeof(float));
  if (k) {
    out->set_probabilities(reinterpret_cast<const char*>(probs.data()), probs.size() * sizeof(float));
    for (size_t row = 0; row < n * t; ++row) {
      out->add_index(static_cast<uint32_t>(argmax(&probs[row * k], static_cast<int>(k))));
    }
  }
  out->set_expires_at(any_found_ ? unix_now() + core_->store().ttl_s() : 0.0);
  Write(reply_);
}

// ---- the service --------------------------------------------------------------------------------

using RawBase = pb::RnnServe::WithRawCallbackMethod_OpenSession<
    pb::RnnServe::WithRawCallbackMethod_CloseSession<pb::RnnServe::WithRawCallbackMethod_ResetSession<
        pb::RnnServe::WithRawCallbackMethod_Step<pb::RnnServe::WithRawCallbackMethod_Session<
            pb::RnnServe::WithRawCallbackMethod_StepMany<pb::RnnServe::WithRawCallbackMethod_ExportSession<
                pb::RnnServe::WithRawCallbackMethod_ImportSession<pb::RnnServe::Service>>>>>>>>;

// A unary call's messages, alive until its answer is written (the step may answer later, on the
// scheduler's thread).
template <class Req, class Rep>
struct Unary {
  Unary(Core* core, grpc::CallbackServerContext* ctx, std::string method) : scope(core, ctx, std::move(method)) {}
  CallScope scope;
  Req request;
  Rep reply;
};

class RnnServeService final : public RawBase {
 public:
  explicit RnnServeService(Core* core) : core_(core) {
    const auto* service = pb::RnnServe::service_full_name();
    const auto* d = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
    const std::set<std::string> bridged(std::begin(kBridged), std::end(kBridged));
    for (int i = 0; i < d->method_count(); ++i) {
      if (bridged.count(d->method(i)->name())) MarkMethodGeneric(i);  // served by the bridge
    }
  }

  grpc::ServerUnaryReactor* OpenSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* in,
                                        grpc::ByteBuffer* out) override {
    CallScope scope(core_, ctx, std::string(kService) + "OpenSession");
    if (scope.refused()) return finish(ctx, scope, rich_status(*scope.refused()));
    pb::OpenSessionRequest req;
    if (!parse(*in, &req)) return finish(ctx, scope, rich_status(malformed(req)));
    scope.set_model(req.model());
    auto v = core_->open_session(req.model(), req.version(), "");
    if (!v.ok()) return finish(ctx, scope, rich_status(v.error()));
    pb::SessionInfo reply;
    fill_session(v.value(), &reply);
    *out = serialize(reply);
    return finish(ctx, scope, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* in,
                                         grpc::ByteBuffer* out) override {
    CallScope scope(core_, ctx, std::string(kService) + "CloseSession");
    if (scope.refused()) return finish(ctx, scope, rich_status(*scope.refused()));
    pb::CloseSessionRequest req;
    if (!parse(*in, &req)) return finish(ctx, scope, rich_status(malformed(req)));
    auto found = own_session(core_, req.session_id());
    if (found.ok()) scope.set_model(found.value()->model->name);
    std::optional<Error> err = found.ok() ? core_->close_session(req.session_id()) : found.error();
    if (!err) *out = serialize(pb::CloseSessionResponse());
    return finish(ctx, scope, err ? rich_status(*err) : grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* ResetSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* in,
                                         grpc::ByteBuffer* out) override {
    CallScope scope(core_, ctx, std::string(kService) + "ResetSession");
    if (scope.refused()) return finish(ctx, scope, rich_status(*scope.refused()));
    pb::ResetSessionRequest req;
    if (!parse(*in, &req)) return finish(ctx, scope, rich_status(malformed(req)));
    auto found = own_session(core_, req.session_id());
    if (!found.ok()) return finish(ctx, scope, rich_status(found.error()));
    scope.set_model(found.value()->model->name);
    auto v = core_->reset_session(req.session_id());
    if (!v.ok()) return finish(ctx, scope, rich_status(v.error()));
    pb::SessionInfo reply;
    fill_session(v.value(), &reply);
    *out = serialize(reply);
    return finish(ctx, scope, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* in,
                                 grpc::ByteBuffer* out) override {
    auto call = std::make_shared<Unary<pb::StepRequest, pb::StepResponse>>(core_, ctx, std::string(kService) + "Step");
    if (call->scope.refused()) return finish(ctx, call->scope, rich_status(*call->scope.refused()));
    if (!parse(*in, &call->request)) return finish(ctx, call->scope, rich_status(malformed(call->request)));
    auto prepared = prepare(core_, call->request.session_id(), call->request, &call->scope);
    if (!prepared.ok()) return finish(ctx, call->scope, rich_status(prepared.error()));
    auto* reactor = ctx->DefaultReactor();
    SessionPtr session = prepared.value().session;
    call->scope.set_model(session->model->name);
    Core* core = core_;
    prepared.value().step.done = [core, reactor, session, call, out](StepOutcome o) {
      grpc::Status status = grpc::Status::OK;
      if (o.ok()) {
        fill_step(core, *session, call->request.session_id(), *o.reply, top_k(call->request), &call->reply);
        *out = serialize(call->reply);
      } else {
        status = rich_status(o.error);
      }
      call->scope.finish(status.error_code());
      reactor->Finish(status);
    };
    core_->stepper().step(std::move(prepared.value().session), std::move(prepared.value().step));
    return reactor;
  }

  grpc::ServerUnaryReactor* ExportSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* in,
                                          grpc::ByteBuffer* out) override {
    auto call = std::make_shared<Unary<pb::ExportSessionRequest, pb::ExportSessionResponse>>(
        core_, ctx, std::string(kService) + "ExportSession");
    if (call->scope.refused()) return finish(ctx, call->scope, rich_status(*call->scope.refused()));
    if (!parse(*in, &call->request)) return finish(ctx, call->scope, rich_status(malformed(call->request)));
    if (core_->stopping()) return finish(ctx, call->scope, rich_status(core_->shutting_down()));
    auto found = own_session(core_, call->request.session_id());
    if (!found.ok()) return finish(ctx, call->scope, rich_status(found.error()));
    call->scope.set_model(found.value()->model->name);
    auto* reactor = ctx->DefaultReactor();
    export_session(*core_, found.value(), call->request.close(), [call, reactor, out](Result<Exported> r) {
      grpc::Status status = grpc::Status::OK;
      if (r.ok()) {
        call->reply.set_blob(std::move(r.value().blob));
        call->reply.set_model(r.value().model);
        call->reply.set_version(r.value().version);
        call->reply.set_next_step_index(r.value().next_index);
        *out = serialize(call->reply);
      } else {
        status = rich_status(r.error());
      }
      call->scope.finish(status.error_code());
      reactor->Finish(status);
    });
    return reactor;
  }

  grpc::ServerUnaryReactor* ImportSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* in,
                                          grpc::ByteBuffer* out) override {
    CallScope scope(core_, ctx, std::string(kService) + "ImportSession");
    if (scope.refused()) return finish(ctx, scope, rich_status(*scope.refused()));
    pb::ImportSessionRequest req;
    if (!parse(*in, &req)) return finish(ctx, scope, rich_status(malformed(req)));
    if (req.session_id().find(':') != std::string::npos) {  // another transport's namespace (own_session)
      return finish(ctx, scope, rich_status(Error::invalid("session_id may not contain ':'", "session_id")));
    }
    auto v = import_session(*core_, ImportRequest{req.blob(), req.session_id(), req.model(), req.version()});
    if (!v.ok()) return finish(ctx, scope, rich_status(v.error()));
    scope.set_model(v.value().model);
    pb::ImportSessionResponse reply;
    reply.set_session_id(v.value().session_id);
    reply.set_model(v.value().model);
    reply.set_version(v.value().version);
    reply.set_next_step_index(v.value().next_step_index);
    reply.set_expires_at(v.value().expires_at);
    *out = serialize(reply);
    return finish(ctx, scope, grpc::Status::OK);
  }

  RawStream* Session(grpc::CallbackServerContext* ctx) override { return new SessionStream(core_, ctx); }
  RawStream* StepMany(grpc::CallbackServerContext* ctx) override { return new StepManyStream(core_, ctx); }

 private:
  Core* core_;
};

}  // namespace

std::unique_ptr<grpc::Service> make_rnnserve_service(Core* core) { return std::make_unique<RnnServeService>(core); }

}  // namespace rnnserve
