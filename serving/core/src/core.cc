#include "core.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <stdexcept>

#include "health_log.h"
#include "memory_store.h"
#include "redis_store.h"
#include "oip_service.h"
#include "rnnserve_service.h"
#include "text.h"

namespace rnnserve {

namespace {

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::shared_ptr<grpc::ServerCredentials> credentials(const CoreConfig& c) {
  if (c.tls_cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions opts(
      c.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  opts.pem_root_certs = c.tls_client_ca;
  opts.pem_key_cert_pairs.push_back({c.tls_key, c.tls_cert});
  return grpc::SslServerCredentials(opts);
}

}  // namespace

Core::Core(CoreConfig config) : config_(std::move(config)), tokens_(config_.token_digests) {
  store_ = make_store();
  stepper_ = std::make_unique<Stepper>(
      [this](const ModelSpec& m) {
        auto it = schedulers_.find(&m);  // none: a session (read from a shared store) of a model
        return it == schedulers_.end() ? nullptr : it->second.get();  // this replica cannot step
      },
                                       store_.get());
}

std::unique_ptr<SessionStore> Core::make_store() {
  auto on_evict = [this](const std::string& model, const char* why) {
    auto& m = metrics_.model(model);
    (std::string(why) == "closed" ? m.closed : m.evicted).fetch_add(1, std::memory_order_relaxed);
  };
  if (config_.session_store == "memory") {
    return std::make_unique<MemoryStore>(config_.session_ttl_s, config_.max_sessions, on_evict);
  }
  return std::make_unique<RedisStore>(
      config_.session_store, config_.session_ttl_s, config_.max_sessions,
      [this](const std::string& name, uint32_t version) { return model(name, version); }, on_evict);
}

Core::~Core() {
  stop(0);
  {
    std::lock_guard<std::mutex> lock(sweep_mu_);
  }
  sweep_wake_.notify_all();
  if (sweeper_.joinable()) sweeper_.join();
}

void Core::add_model(ModelSpec spec, Runner runner) {
  spec.finish();
  auto model = std::make_shared<const ModelSpec>(std::move(spec));
  models_[model->key()] = model;
  auto& latest = latest_[model->name];
  latest = std::max(latest, model->version);
  if (model->streamable) {
    schedulers_[model.get()] = std::make_unique<Scheduler>(
        model, std::move(runner), store_.get(), &metrics_.model(model->name), config_.max_batch,
        config_.queue_delay_s);
  }
}

int Core::start() {
  bridge_pool_ = std::make_unique<BridgePool>(config_.bridge_threads);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config_.address, credentials(config_), &port);
  builder.SetMaxReceiveMessageSize(config_.max_message_bytes);
  builder.SetMaxSendMessageSize(config_.max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a taken port must fail, not share
  if (config_.access_log) builder.experimental().SetInterceptorCreators(health_log_interceptors(this));
  services_.push_back(make_rnnserve_service(this));
  services_.push_back(make_oip_service(this));
  for (auto& s : services_) builder.RegisterService(s.get());
  generic_ = std::make_unique<BridgeService>(this);
  builder.RegisterCallbackGenericService(generic_.get());
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) throw std::runtime_error("cannot bind " + config_.address);
  set_health(true);
  sweeper_ = std::thread([this] { sweep_forever(); });
  return port;
}

void Core::set_health(bool serving) {
  auto* health = server_->GetHealthCheckService();
  health->SetServingStatus(serving);  // every service name, "" included
  for (const char* service : {"rnnserve.v1.RnnServe", "inference.GRPCInferenceService"}) {
    health->SetServingStatus(service, serving);
  }
  for (const auto& [name, latest] : latest_) health->SetServingStatus(name, serving);
}

void Core::stop(double grace_s) {
  if (stopping_.exchange(true)) return;
  if (server_) {
    set_health(false);
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
  }
  for (auto& [model, scheduler] : schedulers_) scheduler->stop();
  bridge_pool_.reset();  // answers what was posted, then joins
  sweep_wake_.notify_all();
}

void Core::wait() {
  if (server_) server_->Wait();
}

void Core::sweep_forever() {
  const double interval = std::min(config_.session_ttl_s / 2, 30.0);
  std::unique_lock<std::mutex> lock(sweep_mu_);
  while (!stopping_) {
    sweep_wake_.wait_for(lock, std::chrono::duration<double>(interval));
    if (!stopping_) store_->sweep();
  }
}

Result<ModelPtr> Core::model(const std::string& name, uint32_t version) const {
  auto latest = latest_.find(name);
  if (latest == latest_.end()) {
    std::string known;
    for (const auto& [n, v] : latest_) known += (known.empty() ? "" : ", ") + n;
    return Error::of(ErrorKind::kModelNotFound, "unknown model " + py_repr(name) + "; this server has: " + known);
  }
  const uint32_t v = version ? version : latest->second;
  auto it = models_.find(name + ":" + std::to_string(v));
  if (it == models_.end()) {
    std::string have;
    for (const auto& [key, m] : models_) {
      if (m->name == name) have += (have.empty() ? "" : ", ") + std::to_string(m->version);
    }
    return Error::of(ErrorKind::kVersionNotFound, "model " + py_repr(name) + " has no version " +
                                                      std::to_string(v) + "; loaded: " + have);
  }
  return it->second;
}

std::vector<ModelPtr> Core::models() const {
  std::vector<ModelPtr> out;
  for (const auto& [key, m] : models_) out.push_back(m);
  return out;
}

bool Core::admit() {
  if (active_calls_.fetch_add(1, std::memory_order_relaxed) < config_.max_concurrent_rpcs) return true;
  active_calls_.fetch_sub(1, std::memory_order_relaxed);
  return false;
}

void Core::release() { active_calls_.fetch_sub(1, std::memory_order_relaxed); }

Error Core::shutting_down() const {
  return Error::of(ErrorKind::kUnavailable, "server is shutting down; retry on another instance");
}

Result<SessionView> Core::open_session(const std::string& name, uint32_t version, const std::string& id,
                                       const SessionRecord* from) {
  if (stopping_) return shutting_down();
  auto m = model(name, version);
  if (!m.ok()) return m.error();
  if (!m.value()->streamable) {
    return Error::of(ErrorKind::kNotStreamable,
                     m.value()->name + " is not streamable (it reads whole sequences, e.g. bidirectional): "
                                       "use Predict with the whole sequence instead of sessions/Step");
  }
  auto s = store_->open(m.value(), id, from);
  if (!s.ok()) return s.error();
  return view(*s.value());
}

Result<SessionView> Core::reset_session(const std::string& id) {
  auto found = store_->get(id);
  if (!found.ok()) return found.error();
  Session& s = *found.value();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.busy) {
      return Error::out_of_order("session " + py_repr(id) + " has a step in flight; reset after it answers",
                                 s.next_index);
    }
    s.busy = true;  // the gate, held until the reset is stored: no step may commit in between
    s.reset_state();
    s.next_index = 0;
    s.last.reset();
  }
  auto err = store_->save(s);
  stepper_->release(found.value());  // steps that arrived meanwhile run now, in order
  if (err) return *err;
  return view(s);
}

double Core::expires_at(const Session& s) const {
  const double idle = static_cast<double>(now_ns() - s.last_used_ns.load()) / 1e9;
  return unix_now() + std::max(0.0, config_.session_ttl_s - idle);
}

SessionView Core::view(const Session& s) {
  SessionView v;
  v.session_id = s.id;
  v.model = s.model->name;
  v.version = s.model->version;
  v.expires_at = expires_at(s);
  {
    std::lock_guard<std::mutex> lock(const_cast<Session&>(s).mu);
    v.next_step_index = s.next_index;
  }
  return v;
}

}  // namespace rnnserve
