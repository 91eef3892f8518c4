// The embedded default store: sessions in this process's memory, an idle TTL, a capacity limit,
// and tombstones that tell an expired id from one that never existed. Nothing is durable: a
// restart loses every session (a shared store is the answer to that).
#pragma once

#include <deque>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "store.h"

namespace rnnserve {

class MemoryStore final : public SessionStore {
 public:
  MemoryStore(double ttl_s, size_t max_sessions, EvictHook on_evict, size_t tombstones = 65536);

  Result<SessionPtr> open(ModelPtr model, const std::string& id, const SessionRecord* from) override;
  Result<SessionPtr> get(const std::string& id) override;
  std::optional<Error> close(const std::string& id) override;
  std::optional<Error> close_opening(Session& s) override;
  std::vector<std::optional<Error>> commit(std::vector<Commit>& commits) override;
  size_t sweep() override;
  size_t count(const std::string& model_name) const override;
  size_t count_version(const ModelSpec& model) const override;
  std::unordered_map<const ModelSpec*, size_t> count_by_version() const override;
  size_t size() const override;
  double ttl_s() const override { return ttl_s_; }
  void close_all() override;

 private:
  bool idle(Session& s, int64_t now) const;
  Error missing(const std::string& id);  // mu_ held
  void evict(const std::string& id, const char* why);  // mu_ held
  void remove(const SessionPtr& s);  // mu_ held
  size_t sweep_locked();
  std::optional<Error> check_client_id(const std::string& id) const;

  const double ttl_s_;
  const int64_t ttl_ns_;
  const size_t max_sessions_;
  const size_t max_tombstones_;
  EvictHook on_evict_;
  mutable std::mutex mu_;
  std::unordered_map<std::string, SessionPtr> live_;
  std::unordered_set<std::string> expired_;
  std::deque<std::string> expired_order_;  // oldest tombstone first
  std::unordered_map<const ModelSpec*, size_t> version_counts_;  // live sessions by model version
};

std::string new_session_id();  // 128 random bits, url-safe base64 (as Python's token_urlsafe(16))

}  // namespace rnnserve
