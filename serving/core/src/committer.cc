#include "committer.h"

namespace rnnserve {

Committer::Committer(size_t workers, size_t max_pending) : max_pending_(max_pending) {
  try {
    for (size_t i = 0; i < workers; ++i) workers_.emplace_back([this] { loop(); });
  } catch (...) {  // a thread that could not start: join the ones that did
    stop();
    throw;
  }
}

Committer::~Committer() { stop(); }

void Committer::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void Committer::post(std::function<void()> work) {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait(lock, [this] { return pending_.size() < max_pending_; });
  pending_.push_back(std::move(work));
  lock.unlock();
  changed_.notify_all();
}

void Committer::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    changed_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
    if (pending_.empty()) return;  // stopping, and everything posted has run
    auto work = std::move(pending_.front());
    pending_.pop_front();
    lock.unlock();
    changed_.notify_all();
    work();
    lock.lock();
  }
}

}  // namespace rnnserve
