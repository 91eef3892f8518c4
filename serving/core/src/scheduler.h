// One scheduler per streamable model version: many sessions' queued steps → one model call.
//
// Rules a batch obeys:
// * it takes what is queued when the worker wakes and never waits on a timer unless a queue delay
//   is configured; while one batch runs, the next one forms in the queue;
// * the thread that queues into an idle scheduler runs the batch itself when it is one already (a
//   StepMany message's steps of one length) or when it is the next step of the session that was
//   the last batch's only one (a lone session): waking the worker would cost more than company
//   could save. Only the memory store without a queue delay does this. (Not a moving average of
//   batch sizes: at 16 callers, steps run this way come in batches of one or two, which would keep
//   such an average low and the server in this mode, at about twice the CPU per step.);
// * one time length T per batch (rows stack on the batch dim without padding, so outputs are
//   exact); other lengths wait for the next turn, in arrival order;
// * at most max_batch rows; at most one step per session (the session gate guarantees it);
// * states are gathered from the sessions into (L, B, H) arrays before the call and scattered
//   into the batch's commits after it; the model call holds no lock of the core;
// * the store records the batch's new states and replies (one commit per batch) and moves the
//   states into the sessions before any reply is answered; a failed commit changes no session;
//   with a remote store that happens on a thread of its own while the next batch runs;
// * a failed call (the runner raised, or answered other shapes) fails every step of the batch
//   and stores no state;
// * a step the store finds ran on a stale copy of its session (another replica moved it on) runs
//   again, first in line, on the copy the store re-read.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "committer.h"
#include "metrics.h"
#include "model.h"
#include "session.h"
#include "store.h"

namespace rnnserve {

// A batch as the model runner sees it.
struct Batch {
  int rows = 0;
  uint32_t steps = 0;
  std::vector<float> features;  // (B, T, F), feature models
  std::vector<int64_t> ids;     // (B, T), token models
  std::vector<std::vector<float>> states;  // per state tensor (L, B, H): in, then the new states
  std::vector<float> y;         // (B, T, O), filled by the runner
  int64_t started_ns = 0, finished_ns = 0;  // the model call
};

// Runs a model's step graph on a batch; throws std::exception to fail the batch.
using Runner = std::function<void(const ModelSpec&, Batch&)>;

struct Job {
  SessionPtr session;
  uint64_t index = 0;  // the step index this step runs as
  bool explicit_index = false;  // the client named the index (so a step stored under it is a retry)
  int reruns = 0;  // times a shared store found it ran on a stale copy of its session
  StepInput input;
  int64_t queued_ns = 0;
  std::function<void(Result<ReplyPtr>)> done;  // on the scheduler thread
};

class Scheduler {
 public:
  Scheduler(ModelPtr model, Runner runner, SessionStore* store, ModelMetrics* metrics,
            int max_batch, double queue_delay_s);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // One wake-up for all of them. `may_run_here` false: never on the calling thread (a message's
  // other models' batches are still to be handed out after this one).
  void submit(std::vector<Job> jobs, bool may_run_here = true);
  void stop();                         // queued steps fail with UNAVAILABLE; joins the worker

 private:
  void loop();
  bool runs_here(const std::vector<Job>& jobs) const;  // under mu_: on the submitting thread
  void run_here(std::vector<Job>& jobs);
  void ran(const Session* alone);  // under mu_: the batch is done
  static const Session* sole_session(const std::vector<Job>& jobs);  // the batch's only session
  std::vector<Job> take(std::unique_lock<std::mutex>& lock);
  void run(std::vector<Job>& jobs);
  bool call_model(std::vector<Job>& jobs, Batch& batch);
  void gather(const std::vector<Job>& jobs, Batch& batch) const;
  void scatter(std::vector<Commit>& commits, const Batch& batch) const;  // new states, not yet the sessions'
  void answer(std::vector<Job>& jobs, const Batch& batch);
  void settle(std::vector<Job>& jobs, std::vector<Commit>& commits);  // store, then reply
  void fail(std::vector<Job>& jobs, const Error& err);
  void run_again(std::vector<Job> jobs);

  const ModelPtr model_;
  const Runner runner_;
  SessionStore* const store_;
  ModelMetrics* const metrics_;
  const size_t max_batch_;
  const int64_t queue_delay_ns_;
  std::mutex mu_;
  std::mutex stop_mu_;  // held through stop(): a second caller waits, then finds it done
  std::condition_variable wake_;
  std::deque<Job> queue_;
  bool stopping_ = false;
  bool running_ = false;  // a batch runs, on the worker or on a submitting thread
  const Session* alone_ = nullptr;  // the last batch's only session; compared, never dereferenced
  const bool may_run_here_;   // the memory store, no queue delay
  std::unique_ptr<Committer> committer_;  // a remote store only: commits overlap the next batch
  std::thread worker_;  // last: it starts once the members above exist
};

}  // namespace rnnserve
