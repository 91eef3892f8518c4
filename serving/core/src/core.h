// The façade: models, the session store, one scheduler per streamable model, the step protocol,
// metrics, the Python bridge and the gRPC server that serves them all on one port.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "bridge.h"
#include "call.h"
#include "metrics.h"
#include "model.h"
#include "scheduler.h"
#include "stepper.h"
#include "store.h"

namespace rnnserve {

struct CoreConfig {
  std::string address = "127.0.0.1:0";
  int max_batch = 256;
  double queue_delay_s = 0.0;
  double session_ttl_s = 600.0;
  size_t max_sessions = 100000;
  int max_message_bytes = 4 * 1024 * 1024;
  int bridge_threads = 4;
  std::string tls_cert, tls_key, tls_client_ca;  // PEM text; empty cert = plaintext
  std::string session_store = "memory";  // or redis://HOST:PORT[/DB] (shared by replicas)
  size_t max_concurrent_rpcs = 10000;  // past it: RESOURCE_EXHAUSTED (health checks exempt)
  bool access_log = false;             // one line per call, to access_sink (stderr without one)
  std::function<void(const std::string&)> access_sink;
  std::vector<std::pair<std::string, std::string>> token_digests;  // (SHA-256, identity); empty = no auth
};

// One loaded model version: its spec, its scheduler (streamable models only) and whether new work
// may start on it. Never changed once published: a load, retire or remove publishes a new table.
struct LoadedVersion {
  ModelPtr spec;
  std::shared_ptr<Scheduler> scheduler;
  bool ready = true;  // false: unloading; its live sessions keep stepping, nothing new starts on it
};

// The model table. Every call reads a snapshot (one atomic shared_ptr load, no lock); a change
// copies it, edits the copy and publishes it (copy-on-write, writers serialized by a mutex), so a
// call holding an older snapshot keeps a consistent view and the version it found stays alive.
struct ModelTable {
  std::map<std::string, std::shared_ptr<const LoadedVersion>> versions;  // "name:version"
  std::unordered_map<const ModelSpec*, std::shared_ptr<Scheduler>> schedulers;
  std::map<std::string, uint32_t> newest_ready;  // name -> newest ready version (names with one)
};
using ModelTablePtr = std::shared_ptr<const ModelTable>;

struct VersionState {  // what RepositoryIndex, ModelReady, health and metrics show
  ModelPtr spec;
  bool ready = true;
  size_t live_sessions = 0;  // this process's (with a shared store: the ones it has cached)
};

struct SessionView {  // what OpenSession/ResetSession/GetSession answer
  std::string session_id, model;
  uint32_t version = 0;
  double expires_at = 0;  // unix seconds
  uint64_t next_step_index = 0;
};

class Core {
 public:
  explicit Core(CoreConfig config);
  ~Core();
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  // The model table, changeable while serving. add_model throws std::invalid_argument when the
  // version is loaded already. A retired version takes no new sessions or stateless calls; its
  // live sessions keep stepping. remove_model frees a retired version once no session of it is
  // left here: it answers the sessions still live (0: removed).
  void add_model(ModelSpec spec, Runner runner);
  std::optional<Error> set_ready(const std::string& name, uint32_t version, bool ready);
  Result<size_t> remove_model(const std::string& name, uint32_t version);
  std::vector<VersionState> versions() const;
  // An error when `m` is not (or no longer) a ready version of this core: new work must not start.
  std::optional<Error> not_ready(const ModelSpec& m) const;
  void set_bridge(Bridge bridge) { bridge_ = std::move(bridge); }
  int start();                 // binds and serves; returns the port; throws when it cannot bind
  void stop(double grace_s);   // NOT_SERVING, no new calls, in-flight ones answered, then stop
  void wait();

  // For the transports and the Python control plane.
  // Version 0 names the newest ready version (for new work), or with kLoaded the newest loaded
  // one, ready or not (for work that continues live sessions: they keep running on a retired
  // version). A named version: any loaded one (a retired one too, for the sessions that still run
  // on it; check not_ready() before starting new work on it).
  enum class Newest { kReady, kLoaded };
  Result<ModelPtr> model(const std::string& name, uint32_t version, Newest newest = Newest::kReady) const;
  Result<SessionPtr> session(const std::string& id) { return store_->get(id); }
  // from: an imported session's record (ImportSession), checked against the model.
  Result<SessionView> open_session(const std::string& model, uint32_t version, const std::string& id,
                                   const SessionRecord* from = nullptr);
  std::optional<Error> close_session(const std::string& id) { return store_->close(id); }
  Result<SessionView> reset_session(const std::string& id);
  SessionView view(const Session& s);
  double expires_at(const Session& s) const;
  Stepper& stepper() { return *stepper_; }
  Metrics& metrics() { return metrics_; }
  SessionStore& store() { return *store_; }
  BridgePool& bridge_pool() { return *bridge_pool_; }
  const Bridge& bridge() const { return bridge_; }
  const CoreConfig& config() const { return config_; }
  bool stopping() const { return stopping_.load(); }
  const TokenTable& tokens() const { return tokens_; }
  RateLimitedLog& refusals() { return refusals_; }
  bool admit();    // a call may start (false: over max_concurrent_rpcs)
  void release();  // an admitted call ended
  std::vector<ModelPtr> models() const;
  Error shutting_down() const;

 private:
  // model()'s error when the lookup fails: what this server has instead.
  static Result<ModelPtr> model_error(const ModelTable& loaded, const std::string& name, uint32_t version,
                                      Newest newest_wanted);
  void sweep_forever();
  std::unique_ptr<SessionStore> make_store();  // throws when a shared store cannot be reached
  void set_health(bool serving);
  void update_health(const ModelTable& table);  // per model name and "name:version"
  ModelTablePtr table() const { return std::atomic_load(&table_); }
  void publish(std::shared_ptr<ModelTable> table);  // table_mu_ held
  std::shared_ptr<const LoadedVersion> loaded(const std::string& name, uint32_t version) const;
  std::optional<Error> removed(const ModelSpec& m);  // `m` is no longer in the table

  const CoreConfig config_;
  Metrics metrics_;
  std::unique_ptr<SessionStore> store_;
  ModelTablePtr table_;    // read with table(); replaced whole by publish()
  std::mutex table_mu_;    // serializes writers of table_
  std::unique_ptr<Stepper> stepper_;
  Bridge bridge_;
  std::unique_ptr<BridgePool> bridge_pool_;
  std::vector<std::unique_ptr<grpc::Service>> services_;
  std::unique_ptr<grpc::CallbackGenericService> generic_;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<bool> stopping_{false};
  TokenTable tokens_;
  RateLimitedLog refusals_;
  std::mutex health_mu_;
  std::set<std::string> health_known_;  // every "name:version" ever published (removed: NOT_SERVING)
  std::atomic<size_t> active_calls_{0};
  std::mutex sweep_mu_;
  std::condition_variable sweep_wake_;
  std::thread sweeper_;
};

}  // namespace rnnserve
