#include "core.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <set>
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

Core::Core(CoreConfig config)
    : config_(std::move(config)), table_(std::make_shared<const ModelTable>()), tokens_(config_.token_digests) {
  store_ = make_store();
  stepper_ = std::make_unique<Stepper>(
      [this](const ModelSpec& m) -> std::shared_ptr<Scheduler> {
        const auto t = table();
        auto it = t->schedulers.find(&m);  // none: a session (read from a shared store) of a model
        return it == t->schedulers.end() ? nullptr : it->second;  // this replica cannot step
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
  std::lock_guard<std::mutex> lock(table_mu_);
  auto next = std::make_shared<ModelTable>(*table());
  if (next->versions.count(model->key())) {
    throw std::invalid_argument(model->name + " version " + std::to_string(model->version) + " is loaded already");
  }
  auto entry = std::make_shared<LoadedVersion>();
  entry->spec = model;
  if (model->streamable) {
    entry->scheduler = std::make_shared<Scheduler>(model, std::move(runner), store_.get(), &metrics_.model(model->name),
                                                   config_.max_batch, config_.queue_delay_s);
    next->schedulers[model.get()] = entry->scheduler;
  }
  next->versions[model->key()] = std::move(entry);
  publish(std::move(next));
}

std::optional<Error> Core::set_ready(const std::string& name, uint32_t version, bool ready) {
  std::lock_guard<std::mutex> lock(table_mu_);
  auto found = loaded(name, version);
  if (!found) return model(name, version).error();
  auto next = std::make_shared<ModelTable>(*table());
  auto changed = std::make_shared<LoadedVersion>(*found);
  changed->ready = ready;
  next->versions[found->spec->key()] = std::move(changed);
  publish(std::move(next));
  return std::nullopt;
}

Result<size_t> Core::remove_model(const std::string& name, uint32_t version) {
  std::shared_ptr<Scheduler> scheduler;
  {
    std::lock_guard<std::mutex> lock(table_mu_);
    auto found = loaded(name, version);
    if (!found) return model(name, version).error();
    if (found->ready) {
      return Error::invalid(name + " version " + std::to_string(version) + " is ready; retire it before removing it",
                            "version");
    }
    // new sessions are refused (open_session re-checks after opening), so the count only falls
    if (const size_t live = store_->count_version(*found->spec)) return live;
    auto next = std::make_shared<ModelTable>(*table());
    next->versions.erase(found->spec->key());
    next->schedulers.erase(found->spec.get());
    scheduler = found->scheduler;
    publish(std::move(next));
  }
  // joined here, on a control thread: calls holding an older snapshot keep the object alive, but
  // none of its threads runs past this point
  if (scheduler) scheduler->stop();
  return size_t{0};
}

void Core::publish(std::shared_ptr<ModelTable> next) {
  next->newest_ready.clear();
  for (const auto& [key, v] : next->versions) {
    if (!v->ready) continue;
    auto& newest = next->newest_ready[v->spec->name];
    newest = std::max(newest, v->spec->version);
  }
  std::atomic_store(&table_, ModelTablePtr(std::move(next)));
  if (server_ && !stopping_) update_health(*table());
}

std::shared_ptr<const LoadedVersion> Core::loaded(const std::string& name, uint32_t version) const {
  const auto t = table();
  auto it = t->versions.find(name + ":" + std::to_string(version));
  return it == t->versions.end() ? nullptr : it->second;
}

std::vector<VersionState> Core::versions() const {
  std::vector<VersionState> out;
  const auto live = store_->count_by_version();
  for (const auto& [key, v] : table()->versions) {
    auto n = live.find(v->spec.get());
    out.push_back(VersionState{v->spec, v->ready, n == live.end() ? 0 : n->second});
  }
  return out;
}

std::optional<Error> Core::not_ready(const ModelSpec& m) const {
  const auto t = table();
  auto it = t->versions.find(m.key());
  if (it != t->versions.end() && it->second->spec.get() == &m && it->second->ready) return std::nullopt;
  const std::string which = "model " + py_repr(m.name) + " version " + std::to_string(m.version);
  auto newest = t->newest_ready.find(m.name);
  const std::string instead = newest == t->newest_ready.end()
                                  ? "no version of it is ready"
                                  : "new work goes to a ready version (the newest: " + std::to_string(newest->second) + ")";
  if (it == t->versions.end() || it->second->spec.get() != &m) {
    return Error::of(ErrorKind::kVersionNotFound, which + " was unloaded; " + instead);
  }
  return Error::of(ErrorKind::kVersionNotFound,
                   which + " is unloading (" + std::to_string(store_->count_version(m)) +
                       " live sessions finish on it): it takes no new sessions or stateless calls; " + instead);
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
  if (serving) return update_health(*table());
  for (const auto& [key, v] : table()->versions) {
    health->SetServingStatus(v->spec->name, false);
    health->SetServingStatus(key, false);
  }
}

// A model name is SERVING while it has a ready version; "name:version" while that version is
// ready (an unloading or removed version is NOT_SERVING).
void Core::update_health(const ModelTable& t) {
  auto* health = server_->GetHealthCheckService();
  std::map<std::string, bool> names;
  for (const auto& [key, v] : t.versions) {
    health->SetServingStatus(key, v->ready);
    names[v->spec->name] = names[v->spec->name] || v->ready;
  }
  std::lock_guard<std::mutex> lock(health_mu_);
  for (const auto& key : health_known_) {
    if (!t.versions.count(key)) health->SetServingStatus(key, false);  // removed
    const std::string name = key.substr(0, key.rfind(':'));
    names.try_emplace(name, false);
  }
  for (const auto& [name, serving] : names) health->SetServingStatus(name, serving);
  for (const auto& [key, v] : t.versions) health_known_.insert(key);
}

void Core::stop(double grace_s) {
  if (stopping_.exchange(true)) return;
  if (server_) {
    set_health(false);
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
  }
  for (auto& [model, scheduler] : table()->schedulers) scheduler->stop();
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

namespace {

// The newest version of `name` the table holds, ready or not (0: none). Keys are "name:version".
uint32_t newest_loaded_version(const ModelTable& t, const std::string& name) {
  const std::string prefix = name + ":";
  uint32_t newest = 0;
  for (auto it = t.versions.lower_bound(prefix); it != t.versions.end() && it->first.compare(0, prefix.size(), prefix) == 0;
       ++it) {
    newest = std::max(newest, it->second->spec->version);
  }
  return newest;
}

}  // namespace

// Every request resolves its model here: the common case is two map lookups; the listing of
// what exists is built only for an error.
Result<ModelPtr> Core::model(const std::string& name, uint32_t version, Newest newest_wanted) const {
  const auto t = table();
  uint32_t wanted = version;
  if (wanted == 0 && newest_wanted == Newest::kLoaded) {
    wanted = newest_loaded_version(*t, name);
  } else if (wanted == 0) {
    auto newest = t->newest_ready.find(name);
    if (newest != t->newest_ready.end()) wanted = newest->second;
  }
  if (wanted != 0) {
    auto it = t->versions.find(name + ":" + std::to_string(wanted));
    if (it != t->versions.end()) return it->second->spec;
  }
  return model_error(*t, name, version, newest_wanted);
}

Result<ModelPtr> Core::model_error(const ModelTable& loaded, const std::string& name, uint32_t version,
                                   Newest newest_wanted) {
  const ModelTable* t = &loaded;
  std::set<std::string> names;
  std::string have;  // this model's loaded versions
  uint32_t newest_loaded = 0;
  for (const auto& [key, v] : t->versions) {
    const ModelSpec& m = *v->spec;
    names.insert(m.name);
    if (m.name != name) continue;
    have += (have.empty() ? "" : ", ") + std::to_string(m.version) + (v->ready ? "" : " (unloading)");
    newest_loaded = std::max(newest_loaded, m.version);
  }
  if (have.empty()) {
    std::string known;
    for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
    return Error::of(ErrorKind::kModelNotFound, "unknown model " + py_repr(name) + "; this server has: " + known);
  }
  if (version == 0 && newest_wanted == Newest::kLoaded) version = newest_loaded;
  if (version == 0) {
    auto newest = t->newest_ready.find(name);
    if (newest == t->newest_ready.end()) {
      return Error::of(ErrorKind::kVersionNotFound,
                       "model " + py_repr(name) + " has no ready version; loaded: " + have);
    }
    version = newest->second;
  }
  auto it = t->versions.find(name + ":" + std::to_string(version));
  if (it == t->versions.end()) {
    return Error::of(ErrorKind::kVersionNotFound, "model " + py_repr(name) + " has no version " +
                                                      std::to_string(version) + "; loaded: " + have);
  }
  return it->second->spec;
}

std::vector<ModelPtr> Core::models() const {
  std::vector<ModelPtr> out;
  for (const auto& [key, v] : table()->versions) out.push_back(v->spec);
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
  // new sessions start on ready versions only; an imported one continues where it was (as the
  // sessions already live on an unloading version do), but never on a freed version
  if (auto err = from ? std::nullopt : not_ready(*m.value())) return *err;
  auto s = store_->open(m.value(), id, from);
  if (!s.ok()) return s.error();
  // retired or freed meanwhile: its removal may have counted its sessions before this open
  if (auto err = from ? removed(*m.value()) : not_ready(*m.value())) {
    store_->close_opening(*s.value());
    return *err;
  }
  return view(*s.value());
}

// Read under the writers' lock: remove_model counts a version's sessions and unpublishes it in one
// hold, so after an open either that count saw the session (the version stays) or it is gone here.
std::optional<Error> Core::removed(const ModelSpec& m) {
  std::lock_guard<std::mutex> lock(table_mu_);
  auto found = loaded(m.name, m.version);
  if (found && found->spec.get() == &m) return std::nullopt;
  return not_ready(m);  // "... was unloaded; ..."
}

Result<SessionView> Core::reset_session(const std::string& id) {
  auto found = store_->get(id);
  if (!found.ok()) return found.error();
  Session& s = *found.value();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.busy) {
      return Error{ErrorKind::kStepOutOfOrder, "session " + py_repr(id) + " has a step in flight; reset after it answers",
                   "", s.next_index};
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
