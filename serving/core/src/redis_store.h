// The shared, durable session store: every session's state, step index and last reply live in
// Redis, so any replica serves any session and a session outlives the process that opened it.
//
// What it guarantees:
// * a batch's new states and replies are written in one round trip (one script call) before any
//   of its replies leaves; a failed write changes no session and answers UNAVAILABLE;
// * the write is a compare-and-set on the step index, so two replicas never both advance one
//   session: the loser answers with the reply already stored for that index (as a retry would)
//   or with the index the session is now at;
// * sessions this replica served stay cached here; the compare-and-set keeps a stale cache from
//   ever being written back, and a step_index the cache does not expect re-reads the record;
// * idle expiry is Redis's own key expiry, and capacity is counted over all replicas in one
//   sorted set (id → idle deadline), so both hold across replicas.
#pragma once

#include <atomic>
#include <functional>
#include <mutex>
#include <unordered_map>

#include "redis_client.h"
#include "session_record.h"
#include "store.h"

namespace rnnserve {

class RedisStore final : public SessionStore {
 public:
  using ModelOf = std::function<Result<ModelPtr>(const std::string& name, uint32_t version)>;
  // Throws std::runtime_error naming the address when Redis cannot be reached.
  RedisStore(const std::string& url, double ttl_s, size_t max_sessions, ModelOf model_of, EvictHook on_evict);

  Result<SessionPtr> open(ModelPtr model, const std::string& id, const SessionRecord* from) override;
  Result<SessionPtr> get(const std::string& id) override;
  std::optional<Error> close(const std::string& id) override;
  std::optional<Error> close_opening(Session& s) override;
  std::vector<std::optional<Error>> commit(std::vector<Commit>& commits) override;
  std::optional<Error> reload(Session& s) override;
  std::optional<Error> save(Session& s) override;
  bool remote() const override { return true; }
  size_t sweep() override;
  size_t count(const std::string& model_name) const override;
  size_t count_version(const ModelSpec& model) const override;
  std::unordered_map<const ModelSpec*, size_t> count_by_version() const override;
  size_t size() const override;
  double ttl_s() const override { return ttl_s_; }
  void close_all() override;

 private:
  Result<SessionPtr> read_through(const std::string& id);
  Error missing(const std::string& id);
  // "session store unavailable (URL: why): " and what became of the call
  Error down(const std::exception& e, const std::string& outcome) const;
  Error unavailable(const std::string& what, const std::exception& e) const;
  // A step's write went out and its outcome is unknown (numbered: the step named its index).
  Error unconfirmed(const RedisDown& e, bool numbered) const;
  // resent: the batch's write went out twice (see RedisPool::pipeline)
  std::optional<Error> settle(Commit& c, const redisReply& outcome, bool resent);
  // The record a commit writes (the session's next index is the step's + 1).
  static std::string record_of(const Commit& c);
  void adopt(Session& s, SessionRecord record);  // the gate is held
  void cache(const SessionPtr& s);
  // The session cached under id (only if it is that incarnation, when one is named).
  void forget(const std::string& id, std::optional<uint64_t> incarnation);
  void forget(Session& s, bool reopened = false);  // reopened: the store holds another opening
  SessionPtr cached(const std::string& id) const;
  std::string record_of(const Session& s) const;  // s.mu held
  std::vector<RedisReplyPtr> write_batch(const std::vector<Commit>& commits, const std::vector<size_t>& sent,
                                         const std::vector<std::string>& keys, const std::vector<std::string>& staged,
                                         const std::vector<std::string>& indexes, bool* resent);

  RedisPool redis_;
  const double ttl_s_;
  const int64_t ttl_ns_;
  const std::string ttl_ms_;
  const size_t max_sessions_;
  ModelOf model_of_;
  EvictHook on_evict_;
  const std::string staged_prefix_;      // this replica's staging keys: its commits never collide
  std::atomic<uint64_t> next_write_{0};  // numbers each staged record: no two writes share a key
  std::string commit_sha_;               // the compare-and-set script, loaded at start
  mutable std::mutex mu_;
  std::unordered_map<std::string, SessionPtr> cached_;
};

}  // namespace rnnserve
