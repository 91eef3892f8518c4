// Where a batch is committed and answered when the session store is remote: threads of their own,
// so the model runs the next batch while the store writes this one, and a batch formed while one
// write is on the wire sends its own at once instead of queueing behind it (a round trip is mostly
// waiting: on the network and on the store's process being scheduled). A batch's sessions keep
// their gates until it is answered, so batches in flight never share a session.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace rnnserve {

class Committer {
 public:
  explicit Committer(size_t workers = 2, size_t max_pending = 2);
  ~Committer();  // runs what was posted, then joins
  Committer(const Committer&) = delete;
  Committer& operator=(const Committer&) = delete;

  // Queues a batch's commit; waits while max_pending are queued (the store sets the pace).
  void post(std::function<void()> work);

 private:
  void loop();
  void stop();  // runs what was posted, then joins

  const size_t max_pending_;
  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<std::function<void()>> pending_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;  // last: they start once the members above exist
};

}  // namespace rnnserve
