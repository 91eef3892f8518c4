// Where a batch is committed and answered when the session store is remote: one thread of its own,
// so the model runs the next batch while the store writes this one. A batch's sessions keep their
// gates until it is answered, so the next batch never holds a session this one is writing.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace rnnserve {

class Committer {
 public:
  explicit Committer(size_t max_pending = 2);
  ~Committer();  // runs what was posted, then joins
  Committer(const Committer&) = delete;
  Committer& operator=(const Committer&) = delete;

  // Queues a batch's commit; waits while max_pending are queued (the store sets the pace).
  void post(std::function<void()> work);

 private:
  void loop();

  const size_t max_pending_;
  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<std::function<void()>> pending_;
  bool stopping_ = false;
  std::thread worker_;  // last: it starts once the members above exist
};

}  // namespace rnnserve
