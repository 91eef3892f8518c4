// One RPC's bookkeeping, the same for every native and bridged method: authentication (bearer
// tokens), admission (at most max_concurrent_rpcs in flight), and at its end the metrics count and
// the access-log line. A call refused here never reaches its handler's work.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "errors.h"

namespace rnnserve {

class Core;

// Token digests (SHA-256) → identities, matched in constant time against every entry.
class TokenTable {
 public:
  TokenTable() = default;
  explicit TokenTable(std::vector<std::pair<std::string, std::string>> digests_and_identities);
  bool enabled() const { return !entries_.empty(); }
  // The caller's identity, or why the call is refused (UNAUTHENTICATED).
  std::pair<std::string, std::optional<Error>> identify(const grpc::ServerContextBase& ctx) const;

 private:
  std::vector<std::pair<std::string, std::string>> entries_;
};

// "what happened (N of these since the last report)" on stderr, at most once per interval per key.
class RateLimitedLog {
 public:
  explicit RateLimitedLog(double every_s = 10.0) : every_ns_(static_cast<int64_t>(every_s * 1e9)) {}
  void warn(const std::string& key, const std::string& message);

 private:
  const int64_t every_ns_;
  std::mutex mu_;
  std::vector<std::pair<std::string, std::pair<int64_t, uint64_t>>> seen_;  // key → (last, count)
};

void log_line(const char* level, const std::string& message);  // Python logging's format
// protobuf's own log lines (an invalid UTF-8 string in a request is one) go through a
// RateLimitedLog: a client sending malformed bytes in a loop must not flood the log. Once a process.
void route_protobuf_logs();
// One access-log line (serving/access_log.py's format), when the access log is on.
void access_log_line(const Core& core, const std::string& method, const std::string& model, grpc::StatusCode code,
                     int64_t started_ns);

class CallScope {
 public:
  // `admit_now` false: the call counts as in flight only from admit() on (bridged calls, whose
  // wait for a bridge thread is a queue, like a call's wait in gRPC's own queue).
  CallScope(Core* core, grpc::CallbackServerContext* ctx, std::string method, bool admit_now = true);
  std::optional<Error> admit();  // RESOURCE_EXHAUSTED past max_concurrent_rpcs
  ~CallScope();
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

  const std::optional<Error>& refused() const { return refused_; }
  const std::string& identity() const { return identity_; }
  void set_model(std::string model) { model_ = std::move(model); }
  void finish(grpc::StatusCode code);  // once; counts and logs the call, frees its admission

 private:
  Core* core_;
  std::string method_;  // "/package.Service/Method"
  std::string identity_, model_;
  std::optional<Error> refused_;
  bool admitted_ = false, finished_ = false;
  int64_t started_ns_;
};

}  // namespace rnnserve
