// The one step protocol: claim → run → commit → release, for every transport and every form
// (a single step, a StepMany entry, a packed block row, an OIP sequence request).
//
// Claim takes the session's gate (or queues the call behind the step holding it) and checks
// step_index: the next index runs; a retry of the last answered index gets its cached reply; any
// other index fails with the index that was expected (after one re-read from a shared store, whose
// copy another replica may have advanced). Commit records the reply for retries and
// advances the index; release hands the gate to the next queued call. A client that goes away
// mid-step changes nothing: the step still commits, and its retry gets the reply.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "scheduler.h"
#include "session.h"
#include "store.h"

namespace rnnserve {

class Stepper {
 public:
  // shared: the model table may drop a version while a call is handing it steps
  using SchedulerOf = std::function<std::shared_ptr<Scheduler>(const ModelSpec&)>;
  Stepper(SchedulerOf scheduler_of, SessionStore* store)
      : scheduler_of_(std::move(scheduler_of)), store_(store) {}

  struct Call {
    SessionPtr session;
    PendingStep step;
  };
  // Claims every call and hands the claimed steps of each model to its scheduler in one go (so
  // a StepMany message's steps share a batch). `done` runs once per call, on whichever thread
  // answers it.
  void step(std::vector<Call> calls);
  void step(SessionPtr session, PendingStep step);
  // Hand the session's gate to the next call in line (or free it). Also for a holder outside the
  // protocol: a reset holds the gate while it stores the fresh state.
  void release(const SessionPtr& session);
  // Runs `fn` holding the session's gate, in line behind the steps that arrived before it (an
  // export sees no half-applied step). fn hands the gate on with release() when done.
  void hold(const SessionPtr& session, std::function<void()> fn);

 private:
  // The gate is held: the call's job, or (no job) *answer holds its cached reply or its error;
  // answers nobody itself.
  std::optional<Job> check(const SessionPtr& session, PendingStep& step, StepOutcome* answer);
  Job job(const SessionPtr& session, uint64_t index, PendingStep step);
  void commit(const SessionPtr& session, Result<ReplyPtr> result, const StepDone& done);
  void submit(std::vector<Job> jobs);

  SchedulerOf scheduler_of_;
  SessionStore* const store_;
};

}  // namespace rnnserve
