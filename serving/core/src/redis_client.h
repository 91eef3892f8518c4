// A small pool of blocking hiredis connections to one Redis, owned through RAII handles.
//
// A connection that saw an I/O error is dropped rather than returned, so the next command
// reconnects: when Redis comes back, the store recovers without a restart. Every command has a
// timeout, so a Redis that stops answering fails calls within it instead of hanging them.
#pragma once

#include <hiredis/hiredis.h>

#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace rnnserve {

struct RedisAddress {
  std::string host;
  int port = 6379;
  int db = 0;
  std::string url;  // as given, for messages
};
// "redis://HOST:PORT[/DB]"; throws std::invalid_argument naming what is wrong.
RedisAddress parse_redis_url(const std::string& url);

struct RedisReplyFree {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using RedisReplyPtr = std::unique_ptr<redisReply, RedisReplyFree>;

struct RedisContextFree {
  void operator()(redisContext* c) const { redisFree(c); }
};
using RedisContextPtr = std::unique_ptr<redisContext, RedisContextFree>;

// Thrown when Redis cannot be reached or a command's reply cannot be read (the connection is
// then dropped). A reply of type error is not thrown: the caller reads it.
struct RedisDown : std::runtime_error {
  explicit RedisDown(const std::string& why, bool sent = true) : std::runtime_error(why), sent(sent) {}
  // false: the commands never left this process (no connection), so none of them ran; true: they
  // may have run, their replies lost (a timeout, a connection cut after writing)
  bool sent;
};

class RedisPool {
 public:
  RedisPool(RedisAddress address, double timeout_s, size_t max_idle = 16);

  using Command = std::vector<std::string_view>;  // its arguments, as binary-safe strings
  RedisReplyPtr command(const Command& args, bool* resent = nullptr);  // resent: see pipeline
  // Several commands sent in one go and their replies read in order: one round trip.
  std::vector<RedisReplyPtr> pipeline(const std::vector<Command>& commands);
  // The same for n commands made one at a time by make(i, scratch) (the command may point into
  // scratch, which lives until the next call): they go out a few at a time, so Redis works on
  // the first while the rest are made. make may be called again for a retry.
  using MakeCommand = std::function<Command(size_t i, std::string& scratch)>;
  // *resent (if given): the commands went out a second time, on a fresh connection, after the
  // first try lost its replies; writes among them may have run twice.
  std::vector<RedisReplyPtr> pipeline(size_t n, const MakeCommand& make, bool* resent = nullptr);
  const RedisAddress& address() const { return address_; }

 private:
  RedisContextPtr connect() const;
  RedisContextPtr acquire(bool* pooled);
  void drop_idle();
  void give_back(RedisContextPtr c);
  // Appends every command, then reads their replies; fewer replies than commands: it failed.
  static std::vector<RedisReplyPtr> send_all(redisContext* c, size_t n, const MakeCommand& make);

  const RedisAddress address_;
  const double timeout_s_;
  const size_t max_idle_;
  std::mutex mu_;
  std::vector<RedisContextPtr> idle_;
};

}  // namespace rnnserve
