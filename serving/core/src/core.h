// The façade: models, the session store, one scheduler per streamable model, the step protocol,
// metrics, the Python bridge and the gRPC server that serves them all on one port.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
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

  void add_model(ModelSpec spec, Runner runner);  // before start()
  void set_bridge(Bridge bridge) { bridge_ = std::move(bridge); }
  int start();                 // binds and serves; returns the port; throws when it cannot bind
  void stop(double grace_s);   // NOT_SERVING, no new calls, in-flight ones answered, then stop
  void wait();

  // For the transports and the Python control plane.
  Result<ModelPtr> model(const std::string& name, uint32_t version) const;  // 0 = latest
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
  void sweep_forever();
  std::unique_ptr<SessionStore> make_store();  // throws when a shared store cannot be reached
  void set_health(bool serving);

  const CoreConfig config_;
  Metrics metrics_;
  std::unique_ptr<SessionStore> store_;
  std::map<std::string, ModelPtr> models_;     // "name:version"
  std::map<std::string, uint32_t> latest_;     // name -> newest version
  std::map<const ModelSpec*, std::unique_ptr<Scheduler>> schedulers_;
  std::unique_ptr<Stepper> stepper_;
  Bridge bridge_;
  std::unique_ptr<BridgePool> bridge_pool_;
  std::vector<std::unique_ptr<grpc::Service>> services_;
  std::unique_ptr<grpc::CallbackGenericService> generic_;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<bool> stopping_{false};
  TokenTable tokens_;
  RateLimitedLog refusals_;
  std::atomic<size_t> active_calls_{0};
  std::mutex sweep_mu_;
  std::condition_variable sweep_wake_;
  std::thread sweeper_;
};

}  // namespace rnnserve
