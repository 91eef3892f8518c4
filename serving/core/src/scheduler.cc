#include "scheduler.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>

#include "text.h"

namespace rnnserve {

namespace {
constexpr int kMaxReruns = 3;  // a session stepped on two replicas at once gives up after these
}

Scheduler::Scheduler(ModelPtr model, Runner runner, SessionStore* store, ModelMetrics* metrics,
                     int max_batch, double queue_delay_s)
    : model_(std::move(model)),
      runner_(std::move(runner)),
      store_(store),
      metrics_(metrics),
      max_batch_(static_cast<size_t>(max_batch)),
      queue_delay_ns_(static_cast<int64_t>(queue_delay_s * 1e9)),
      may_run_here_(queue_delay_ns_ == 0 && !store->remote()),
      committer_(store->remote() ? std::make_unique<Committer>() : nullptr),
      worker_([this] { loop(); }) {}

Scheduler::~Scheduler() { stop(); }

void Scheduler::submit(std::vector<Job> jobs, bool may_run_here) {
  const int64_t now = now_ns();
  for (auto& job : jobs) job.queued_ns = now;
  bool here = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      here = may_run_here && runs_here(jobs);  // false while a batch runs: it keeps running_ set
      if (here) running_ = true;
      if (!here) {
        for (auto& job : jobs) queue_.push_back(std::move(job));
        jobs.clear();
      }
    }
  }
  if (here) return run_here(jobs);
  if (jobs.empty()) {
    wake_.notify_one();
  } else {
    fail(jobs, Error::of(ErrorKind::kUnavailable, "server is shutting down; retry on another instance"));
  }
}

bool Scheduler::runs_here(const std::vector<Job>& jobs) const {
  if (!may_run_here_ || running_ || !queue_.empty() || jobs.empty() || jobs.size() > max_batch_) return false;
  if (jobs.size() == 1) return jobs.front().session.get() == alone_;
  const uint32_t steps = jobs.front().input.steps;
  return std::all_of(jobs.begin(), jobs.end(), [steps](const Job& j) { return j.input.steps == steps; });
}

void Scheduler::run_here(std::vector<Job>& jobs) {
  const Session* alone = sole_session(jobs);
  run(jobs);
  {
    std::lock_guard<std::mutex> lock(mu_);
    ran(alone);
    if (queue_.empty() && !stopping_) return;
  }
  wake_.notify_all();  // the worker takes what queued meanwhile; stop() waits for this batch
}

void Scheduler::ran(const Session* alone) {
  running_ = false;
  alone_ = alone;
}

const Session* Scheduler::sole_session(const std::vector<Job>& jobs) {
  return jobs.size() == 1 ? jobs.front().session.get() : nullptr;
}

void Scheduler::stop() {
  std::lock_guard<std::mutex> one_at_a_time(stop_mu_);  // the drain and a version's removal may race
  std::deque<Job> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !worker_.joinable()) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (worker_.joinable()) worker_.join();
  {
    std::unique_lock<std::mutex> lock(mu_);
    wake_.wait(lock, [this] { return !running_; });  // a batch running on a submitting thread
  }
  committer_.reset();  // answers the batches it holds
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(queue_);
  }
  std::vector<Job> jobs(std::make_move_iterator(left.begin()), std::make_move_iterator(left.end()));
  fail(jobs, Error::of(ErrorKind::kUnavailable, "server is shutting down; retry on another instance"));
}

void Scheduler::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    wake_.wait(lock, [this] { return stopping_ || (!queue_.empty() && !running_); });
    if (stopping_) return;
    if (queue_delay_ns_ > 0 && queue_.size() < max_batch_) {  // optional: wait for company
      const auto deadline = std::chrono::steady_clock::time_point(
          std::chrono::nanoseconds(queue_.front().queued_ns + queue_delay_ns_));
      wake_.wait_until(lock, deadline, [this] { return stopping_ || queue_.size() >= max_batch_; });
      if (stopping_) return;
    }
    std::vector<Job> jobs = take(lock);
    const Session* alone = sole_session(jobs);
    running_ = true;
    lock.unlock();
    run(jobs);
    lock.lock();
    ran(alone);
  }
}

std::vector<Job> Scheduler::take(std::unique_lock<std::mutex>&) {
  std::vector<Job> jobs;
  const uint32_t steps = queue_.front().input.steps;
  std::deque<Job> rest;  // other lengths, in arrival order, ahead of what is left unscanned
  while (!queue_.empty() && jobs.size() < max_batch_) {  // a full batch ends the scan: a deep
    Job& job = queue_.front();                            // queue is not walked every turn
    if (job.input.steps == steps) {
      jobs.push_back(std::move(job));
    } else {
      rest.push_back(std::move(job));
    }
    queue_.pop_front();
  }
  while (!rest.empty()) {
    queue_.push_front(std::move(rest.back()));
    rest.pop_back();
  }
  return jobs;
}

void Scheduler::run(std::vector<Job>& jobs) {
  Batch batch;
  batch.rows = static_cast<int>(jobs.size());
  batch.steps = jobs.front().input.steps;
  gather(jobs, batch);
  const int64_t started = batch.started_ns = now_ns();
  if (!call_model(jobs, batch)) return;
  const int64_t finished = batch.finished_ns = now_ns();
  metrics_->compute_ns.fetch_add(static_cast<uint64_t>(finished - started), std::memory_order_relaxed);
  for (const auto& job : jobs) {
    metrics_->queue_ns.fetch_add(static_cast<uint64_t>(started - job.queued_ns), std::memory_order_relaxed);
  }
  metrics_->batches.fetch_add(1, std::memory_order_relaxed);
  metrics_->batch_size.observe(static_cast<double>(jobs.size()));
  answer(jobs, batch);
}

bool Scheduler::call_model(std::vector<Job>& jobs, Batch& batch) {
  try {
    runner_(*model_, batch);
  } catch (const std::exception& e) {
    fail(jobs, Error::of(ErrorKind::kInternal, std::string("internal error: ") + e.what()));
    return false;
  }
  return true;
}

void Scheduler::gather(const std::vector<Job>& jobs, Batch& batch) const {
  const ModelSpec& m = *model_;
  const size_t rows = jobs.size(), t = batch.steps;
  if (m.tokens) {
    batch.ids.resize(rows * t);
    for (size_t b = 0; b < rows; ++b) std::memcpy(&batch.ids[b * t], jobs[b].input.id_rows(), t * sizeof(int64_t));
  } else {
    const size_t row = t * static_cast<size_t>(m.features);
    batch.features.resize(rows * row);
    for (size_t b = 0; b < rows; ++b) {
      std::memcpy(&batch.features[b * row], jobs[b].input.feature_rows(), row * sizeof(float));
    }
  }
  size_t at = 0;  // the state tensor's offset inside a session's state
  for (const auto& spec : m.states) {
    const size_t h = static_cast<size_t>(spec.size);
    std::vector<float> stacked(static_cast<size_t>(spec.layers) * rows * h);  // (L, B, H)
    for (size_t l = 0; l < static_cast<size_t>(spec.layers); ++l) {
      for (size_t b = 0; b < rows; ++b) {
        std::memcpy(&stacked[(l * rows + b) * h], &jobs[b].session->state[at + l * h], h * sizeof(float));
      }
    }
    batch.states.push_back(std::move(stacked));
    at += spec.floats();
  }
}

void Scheduler::scatter(std::vector<Commit>& commits, const Batch& batch) const {
  const size_t rows = commits.size();
  for (auto& c : commits) c.state.resize(model_->state_floats);
  size_t at = 0;
  for (size_t k = 0; k < model_->states.size(); ++k) {
    const auto& spec = model_->states[k];
    const size_t h = static_cast<size_t>(spec.size);
    for (size_t l = 0; l < static_cast<size_t>(spec.layers); ++l) {
      for (size_t b = 0; b < rows; ++b) {
        std::memcpy(&commits[b].state[at + l * h], &batch.states[k][(l * rows + b) * h], h * sizeof(float));
      }
    }
    at += spec.floats();
  }
}

void Scheduler::answer(std::vector<Job>& jobs, const Batch& batch) {
  const size_t per_row = batch.steps * static_cast<size_t>(model_->output_size);
  std::vector<Commit> commits;
  commits.reserve(jobs.size());
  for (size_t b = 0; b < jobs.size(); ++b) {
    auto reply = std::make_shared<Reply>();
    reply->step_index = jobs[b].index;
    reply->steps = batch.steps;
    reply->queue_ns = batch.started_ns - jobs[b].queued_ns;
    reply->batch_ns = batch.finished_ns - batch.started_ns;
    reply->y.assign(batch.y.begin() + static_cast<std::ptrdiff_t>(b * per_row),
                    batch.y.begin() + static_cast<std::ptrdiff_t>((b + 1) * per_row));
    commits.push_back(Commit{jobs[b].session.get(), jobs[b].index, std::move(reply), {}, jobs[b].explicit_index});
  }
  scatter(commits, batch);
  if (!committer_) return settle(jobs, commits);
  auto held = std::make_shared<std::pair<std::vector<Job>, std::vector<Commit>>>(std::move(jobs), std::move(commits));
  committer_->post([this, held] { settle(held->first, held->second); });
}

void Scheduler::settle(std::vector<Job>& jobs, std::vector<Commit>& commits) {
  const auto stored = store_->commit(commits);
  const int64_t now = now_ns();
  std::vector<Job> again;
  for (size_t b = 0; b < jobs.size(); ++b) {
    if (commits[b].stale && jobs[b].reruns < kMaxReruns) {
      jobs[b].reruns += 1;
      {
        std::lock_guard<std::mutex> lock(jobs[b].session->mu);
        jobs[b].index = jobs[b].session->next_index;
      }
      again.push_back(std::move(jobs[b]));
      continue;
    }
    metrics_->step_latency.observe(static_cast<double>(now - jobs[b].queued_ns) / 1e9);
    if (commits[b].stale) {
      jobs[b].done(Error::of(ErrorKind::kUnavailable, "session " + py_repr(jobs[b].session->id) +
                                                          " is being stepped on another replica at the same time; retry"));
    } else if (stored[b]) {
      jobs[b].done(*stored[b]);
    } else {
      jobs[b].done(ReplyPtr(commits[b].reply));
      metrics_->steps_ok.fetch_add(1, std::memory_order_relaxed);
    }
  }
  if (!again.empty()) run_again(std::move(again));
}

void Scheduler::run_again(std::vector<Job> jobs) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      for (auto it = jobs.rbegin(); it != jobs.rend(); ++it) queue_.push_front(std::move(*it));
      jobs.clear();
    }
  }
  if (jobs.empty()) {
    wake_.notify_one();
    return;
  }
  fail(jobs, Error::of(ErrorKind::kUnavailable, "server is shutting down; retry on another instance"));
}

void Scheduler::fail(std::vector<Job>& jobs, const Error& err) {
  metrics_->steps_failed.fetch_add(jobs.size(), std::memory_order_relaxed);
  for (auto& job : jobs) job.done(err);
}

}  // namespace rnnserve
