// One client sequence: its recurrent state, its step bookkeeping and its gate.
//
// The gate serializes a session's steps in arrival order without a thread or timer of its own:
// `busy` is held from claim to commit, and calls that find it taken wait in `waiting`, started by
// the release of the step before them (see stepper.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "codec.h"
#include "errors.h"
#include "model.h"

namespace rnnserve {

// A step's answer, kept as the session's last reply so that a retry of its index gets it again.
struct Reply {
  uint64_t step_index = 0;
  uint32_t steps = 0;
  std::vector<float> y;  // (T, O) head outputs
  int64_t queue_ns = 0, batch_ns = 0;  // waited for its batch, the batch's model call (OIP statistics)
};
using ReplyPtr = std::shared_ptr<const Reply>;

struct StepOutcome {
  ReplyPtr reply;  // set when the step ran (or was a retry of the last one)
  Error error;     // otherwise
  bool ok() const { return reply != nullptr; }
};
using StepDone = std::function<void(StepOutcome)>;

struct PendingStep {
  StepInput input;
  std::optional<uint64_t> want;  // the client's step_index; none = "the next one"
  StepDone done;
  std::function<void()> hold = nullptr;  // set: not a step but a holder of the gate (Stepper::hold)
};

int64_t now_ns();  // steady clock

struct SessionRecord;

struct Session {
  Session(std::string id, ModelPtr model);

  const std::string id;
  const ModelPtr model;
  std::atomic<int64_t> last_used_ns;

  std::mutex mu;  // guards everything below but `state`, which the gate's holder owns
  bool busy = false;
  bool closed = false;
  bool reopened = false;  // closed because a shared store holds another opening of its id
  bool transient = false;  // a stateless row's throwaway session: no store holds or records it
  uint64_t next_index = 0;
  // Which opening of this id a shared store holds (a random number each open): an id closed and
  // opened again can come back to the same index, and a late write of the earlier opening must
  // not land on the later one. Set before the session is shared, never changed (read without
  // `mu`). 0 in the memory store, which has one copy.
  uint64_t incarnation = 0;
  ReplyPtr last;
  std::deque<PendingStep> waiting;

  std::vector<float> state;  // (L, H) per state tensor, concatenated; written by the gate's holder

  void reset_state();
  bool is_closed();  // takes mu
  // Takes an imported session's index, last reply and state (sized for this model: checked).
  void restore(const SessionRecord& record);
};
using SessionPtr = std::shared_ptr<Session>;

// A call's session was closed and its id opened again (perhaps on another replica) meanwhile.
Error session_reopened(const std::string& id);

}  // namespace rnnserve
