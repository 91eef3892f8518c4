#include "stepper.h"

#include <map>

#include "text.h"

namespace rnnserve {

void Stepper::step(SessionPtr session, PendingStep pending) {
  std::vector<Call> calls;
  calls.push_back(Call{std::move(session), std::move(pending)});
  step(std::move(calls));
}

void Stepper::step(std::vector<Call> calls) {
  std::vector<Job> jobs;
  for (auto& call : calls) {
    {
      std::lock_guard<std::mutex> lock(call.session->mu);
      if (call.session->busy) {  // in flight elsewhere (or earlier in this message): wait in line
        call.session->waiting.push_back(std::move(call.step));
        continue;
      }
      call.session->busy = true;
    }
    StepOutcome answer;
    if (auto claimed_job = check(call.session, call.step, &answer)) {
      jobs.push_back(std::move(*claimed_job));
      continue;
    }
    release(call.session);
    call.step.done(std::move(answer));
  }
  submit(std::move(jobs));
}

std::optional<Job> Stepper::check(const SessionPtr& s, PendingStep& pending, StepOutcome* answer) {
  std::optional<Error> error;
  ReplyPtr cached;
  uint64_t index = 0;
  for (bool reloaded = false;; reloaded = true) {
    error.reset();
    std::unique_lock<std::mutex> lock(s->mu);
    const uint64_t expected = s->next_index;
    if (s->closed) {
      error = s->reopened ? session_reopened(s->id)
                          : Error::of(ErrorKind::kSessionNotFound,
                                      "session " + py_repr(s->id) + " was closed while this call waited");
    } else if (!pending.want || *pending.want == expected) {
      index = expected;
    } else if (*pending.want + 1 == expected && s->last) {
      cached = s->last;
    } else {
      error = Error::out_of_order("step_index", *pending.want, "session " + py_repr(s->id), expected);
    }
    // An index this copy does not expect, or a retry answered from it, is checked against the
    // shared store's record first: another replica may have moved the session on, or it may be
    // another opening of the id by now (a stored reply of an earlier run must not answer it).
    const bool ask_store = (cached || (error && error->kind == ErrorKind::kStepOutOfOrder)) && !reloaded;
    if (!ask_store || !store_->remote()) break;
    cached = nullptr;
    lock.unlock();  // the gate is held: nobody else touches the session while it is re-read
    if (auto gone = store_->reload(*s)) {  // closed, or its id opened again: say that instead
      error = std::move(gone);
      break;
    }
  }
  if (!error && !cached) return job(s, index, std::move(pending));
  *answer = cached ? StepOutcome{cached, {}} : StepOutcome{nullptr, *error};
  return std::nullopt;
}

Job Stepper::job(const SessionPtr& s, uint64_t index, PendingStep pending) {
  Job j;
  j.session = s;
  j.index = index;
  j.explicit_index = pending.want.has_value();
  j.input = std::move(pending.input);
  j.done = [this, s, done = std::move(pending.done)](Result<ReplyPtr> result) {
    commit(s, std::move(result), done);
  };
  return j;
}

void Stepper::commit(const SessionPtr& s, Result<ReplyPtr> result, const StepDone& done) {
  if (result.ok()) {
    std::lock_guard<std::mutex> lock(s->mu);
    s->last = result.value();
    s->next_index = result.value()->step_index + 1;
  }
  release(s);
  done(result.ok() ? StepOutcome{result.value(), {}} : StepOutcome{nullptr, result.error()});
}

void Stepper::release(const SessionPtr& s) {
  // A loop, not recursion: every waiting call answered without running (a retry's cached reply,
  // an error) hands the gate on, and a client can queue thousands of those on one session.
  // They are answered in arrival order once the gate has moved on.
  std::vector<std::pair<StepDone, StepOutcome>> answered;
  std::function<void()> holder;
  for (;;) {
    PendingStep next;
    {
      std::lock_guard<std::mutex> lock(s->mu);
      if (s->waiting.empty()) {
        s->busy = false;
        break;
      }
      next = std::move(s->waiting.front());  // the gate passes straight to the next call in line
      s->waiting.pop_front();
    }
    if (next.hold) {
      holder = std::move(next.hold);
      break;
    }
    StepOutcome answer;
    if (auto claimed_job = check(s, next, &answer)) {
      std::vector<Job> jobs;
      jobs.push_back(std::move(*claimed_job));
      submit(std::move(jobs));
      break;
    }
    answered.emplace_back(std::move(next.done), std::move(answer));
  }
  for (auto& [done, outcome] : answered) done(std::move(outcome));
  if (holder) holder();
}

void Stepper::hold(const SessionPtr& s, std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(s->mu);
    if (s->busy) {
      PendingStep in_line;
      in_line.hold = std::move(fn);
      s->waiting.push_back(std::move(in_line));
      return;
    }
    s->busy = true;
  }
  fn();
}

void Stepper::submit(std::vector<Job> jobs) {
  std::map<std::shared_ptr<Scheduler>, std::vector<Job>> by_model;
  const ModelSpec* model = nullptr;  // a message's steps are mostly of one model: one lookup
  std::shared_ptr<Scheduler> found;
  for (auto& j : jobs) {
    if (j.session->model.get() != model) found = scheduler_of_(*(model = j.session->model.get()));
    by_model[found].push_back(std::move(j));
  }
  size_t left = by_model.size();
  for (auto& [scheduler, model_jobs] : by_model) {
    if (scheduler != nullptr) {
      // only the last model's batch may run on this thread: run here first, it would hold back
      // the other models' batches instead of running beside them on their own workers
      scheduler->submit(std::move(model_jobs), --left == 0);
      continue;
    }
    --left;
    for (auto& j : model_jobs) {
      j.done(Error::of(ErrorKind::kNotStreamable, j.session->model->name + " has no step graph on this server"));
    }
  }
}

}  // namespace rnnserve
