// Where sessions live: the interface every session store implements (memory today; a shared,
// durable store next). The core reaches sessions only through it, so a store plugs in without
// touching the transports or the scheduler.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "result.h"
#include "session.h"

namespace rnnserve {

// One answered step as a store records it: the session's new state and index and its reply.
struct Commit {
  Session* session;
  uint64_t index;  // the index the step ran as (the session's next index becomes index + 1)
  ReplyPtr reply;
};

class SessionStore {
 public:
  using EvictHook = std::function<void(const std::string& model, const char* reason)>;
  virtual ~SessionStore() = default;

  // A new session with the model's initial state (id: a fresh 128-bit one unless given).
  virtual Result<SessionPtr> open(ModelPtr model, const std::string& id) = 0;
  // The live session, its idle deadline pushed back; SessionNotFound / SessionExpired.
  virtual Result<SessionPtr> get(const std::string& id) = 0;
  virtual std::optional<Error> close(const std::string& id) = 0;
  // Called once per answered batch, before any reply leaves: a durable store writes the new
  // states and replies here (one round trip). An error fails that step's reply.
  virtual std::vector<std::optional<Error>> commit(const std::vector<Commit>& commits) = 0;
  virtual size_t sweep() = 0;  // expire idle sessions; returns how many
  virtual size_t count(const std::string& model_name) const = 0;
  virtual size_t size() const = 0;
  virtual double ttl_s() const = 0;
  virtual void close_all() = 0;
};

}  // namespace rnnserve
