// Where sessions live: the interface every session store implements (memory today; a shared,
// durable store next). The core reaches sessions only through it, so a store plugs in without
// touching the transports or the scheduler.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "result.h"
#include "session.h"
#include "session_record.h"

namespace rnnserve {

// One answered step as a store records it: the session's new state and index and its reply.
// The session itself is untouched until the store accepts the commit, so a step whose commit
// fails leaves the session exactly as it was.
struct Commit {
  Session* session;
  uint64_t index;  // the index the step ran as (the session's next index becomes index + 1)
  ReplyPtr reply;
  std::vector<float> state;  // the session's new state, laid out as Session::state
  bool explicit_index = false;  // the client named the index: a step stored under it is a retry
  bool stale = false;  // set by the store: it ran on an outdated copy, now re-read; run it again
};

class SessionStore {
 public:
  using EvictHook = std::function<void(const std::string& model, const char* reason)>;
  virtual ~SessionStore() = default;

  // A new session with the model's initial state, or with `from`'s (an imported session: its
  // state, index and last reply, already checked against the model). id: a fresh 128-bit one
  // unless given; a given id that is live fails with SessionExists.
  virtual Result<SessionPtr> open(ModelPtr model, const std::string& id, const SessionRecord* from = nullptr) = 0;
  // The live session, its idle deadline pushed back; SessionNotFound / SessionExpired.
  virtual Result<SessionPtr> get(const std::string& id) = 0;
  virtual std::optional<Error> close(const std::string& id) = 0;
  // Closes this opening of a session only: when its id was closed and opened again since (an OIP
  // sequence restarted by a retry of its start), the newer opening stays and the answer is
  // session_reopened (or the store's "not found" when the id is not open at all).
  virtual std::optional<Error> close_opening(Session& s) = 0;
  // Called once per answered batch, before any reply leaves, with the gates of its sessions held:
  // the store records each new state and reply (a shared store in one round trip) and only then
  // moves the state into the session. An error fails that step's reply. A shared store may
  // replace a commit's reply with the one already stored for that index (another replica ran the
  // same step first: the loser answers as a retry would), or mark it stale.
  virtual std::vector<std::optional<Error>> commit(std::vector<Commit>& commits) = 0;
  // Re-reads a session another replica may have advanced (its gate is held). Nothing: the copy
  // is what the store holds (re-read, or this store is the only copy). An error for the call to
  // answer: the store could not be read, or the session is gone from it (closed, or its id
  // opened again); a copy that is gone is forgotten here, so the next lookup finds what is.
  virtual std::optional<Error> reload(Session&) { return std::nullopt; }
  // Records a session changed outside a step (a reset; its gate is free and its mutex is not held).
  virtual std::optional<Error> save(Session&) { return std::nullopt; }
  // True when a commit is a network round trip (worth overlapping with the next batch).
  virtual bool remote() const { return false; }
  virtual size_t sweep() = 0;  // expire idle sessions; returns how many
  virtual size_t count(const std::string& model_name) const = 0;
  // Sessions of one model version this store holds here (a shared store: those this replica
  // has cached); a retired version is freed when it reaches 0.
  virtual size_t count_version(const ModelSpec& model) const = 0;
  virtual std::unordered_map<const ModelSpec*, size_t> count_by_version() const = 0;  // one pass
  virtual size_t size() const = 0;
  virtual double ttl_s() const = 0;
  virtual void close_all() = 0;
};

}  // namespace rnnserve
