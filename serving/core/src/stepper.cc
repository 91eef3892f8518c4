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
    if (auto claimed_job = claimed(call.session, std::move(call.step))) jobs.push_back(std::move(*claimed_job));
  }
  submit(std::move(jobs));
}

std::optional<Job> Stepper::claimed(const SessionPtr& s, PendingStep pending) {
  std::optional<Error> error;
  ReplyPtr cached;
  uint64_t index = 0;
  for (bool reloaded = false;; reloaded = true) {
    error.reset();
    std::unique_lock<std::mutex> lock(s->mu);
    const uint64_t expected = s->next_index;
    if (s->closed) {
      error = Error::of(ErrorKind::kSessionNotFound, "session " + py_repr(s->id) + " was closed while this call waited");
    } else if (!pending.want || *pending.want == expected) {
      index = expected;
    } else if (*pending.want + 1 == expected && s->last) {
      cached = s->last;
    } else {
      std::string msg = "step_index " + std::to_string(*pending.want) + " is out of order for session " +
                        py_repr(s->id) + ": expected " + std::to_string(expected);
      if (expected) msg += " (or " + std::to_string(expected - 1) + " to retry the last step)";
      error = Error::out_of_order(std::move(msg), expected);
    }
    if (!error || error->kind != ErrorKind::kStepOutOfOrder || reloaded) break;
    lock.unlock();  // the gate is held: nobody else touches the session while it is re-read
    if (!store_->reload(*s)) break;
  }
  if (!error && !cached) return job(s, index, std::move(pending));
  release(s);
  pending.done(cached ? StepOutcome{cached, {}} : StepOutcome{nullptr, *error});
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
  PendingStep next;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    if (s->waiting.empty()) {
      s->busy = false;
      return;
    }
    next = std::move(s->waiting.front());  // the gate passes straight to the next call in line
    s->waiting.pop_front();
  }
  if (auto claimed_job = claimed(s, std::move(next))) {
    std::vector<Job> jobs;
    jobs.push_back(std::move(*claimed_job));
    submit(std::move(jobs));
  }
}

void Stepper::submit(std::vector<Job> jobs) {
  std::map<Scheduler*, std::vector<Job>> by_model;
  for (auto& j : jobs) by_model[scheduler_of_(*j.session->model)].push_back(std::move(j));
  for (auto& [scheduler, model_jobs] : by_model) scheduler->submit(std::move(model_jobs));
}

}  // namespace rnnserve
