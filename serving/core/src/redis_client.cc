#include "redis_client.h"

#include <stdexcept>

namespace rnnserve {

namespace {

timeval as_timeval(double seconds) {
  timeval tv;
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  return tv;
}

int parse_int(const std::string& text, const std::string& url, const char* what) {
  size_t used = 0;
  int value = -1;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size() || value < 0) {
    throw std::invalid_argument("session store " + url + ": " + what + " must be a number, got '" + text + "'");
  }
  return value;
}

}  // namespace

RedisAddress parse_redis_url(const std::string& url) {
  const std::string scheme = "redis://";
  if (url.rfind(scheme, 0) != 0) {
    throw std::invalid_argument("session store must be 'memory' or redis://HOST:PORT[/DB], got '" + url + "'");
  }
  RedisAddress a;
  a.url = url;
  std::string rest = url.substr(scheme.size());
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    a.db = parse_int(rest.substr(slash + 1), url, "the database");
    rest = rest.substr(0, slash);
  }
  const size_t colon = rest.rfind(':');
  a.host = rest.substr(0, colon);
  if (colon != std::string::npos) a.port = parse_int(rest.substr(colon + 1), url, "the port");
  if (a.host.empty()) throw std::invalid_argument("session store " + url + ": no host");
  return a;
}

RedisPool::RedisPool(RedisAddress address, double timeout_s, size_t max_idle)
    : address_(std::move(address)), timeout_s_(timeout_s), max_idle_(max_idle) {}

RedisContextPtr RedisPool::connect() const {
  RedisContextPtr c(redisConnectWithTimeout(address_.host.c_str(), address_.port, as_timeval(timeout_s_)));
  if (!c) throw RedisDown("cannot allocate a Redis connection", /*sent=*/false);
  if (c->err) throw RedisDown(std::string(c->errstr), /*sent=*/false);
  redisSetTimeout(c.get(), as_timeval(timeout_s_));
  if (address_.db != 0) {
    const std::string db = std::to_string(address_.db);
    const char* argv[] = {"SELECT", db.c_str()};
    const size_t len[] = {6, db.size()};
    RedisReplyPtr r(static_cast<redisReply*>(redisCommandArgv(c.get(), 2, argv, len)));
    if (!r) throw RedisDown(std::string(c->errstr), /*sent=*/false);
    if (r->type == REDIS_REPLY_ERROR) {
      throw RedisDown("SELECT " + db + ": " + std::string(r->str, r->len), /*sent=*/false);
    }
  }
  return c;
}

RedisContextPtr RedisPool::acquire(bool* pooled) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    *pooled = !idle_.empty();
    if (*pooled) {
      RedisContextPtr c = std::move(idle_.back());
      idle_.pop_back();
      return c;
    }
  }
  return connect();
}

void RedisPool::give_back(RedisContextPtr c) {
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_.size() < max_idle_) idle_.push_back(std::move(c));
}

RedisReplyPtr RedisPool::command(const Command& args, bool* resent) {
  return std::move(pipeline(1, [&args](size_t, std::string&) { return args; }, resent).front());
}

std::vector<RedisReplyPtr> RedisPool::pipeline(const std::vector<Command>& commands) {
  return pipeline(commands.size(), [&commands](size_t i, std::string&) { return commands[i]; });
}

std::vector<RedisReplyPtr> RedisPool::pipeline(size_t n, const MakeCommand& make, bool* resent) {
  // A pooled connection may have died with a Redis restart; then the pool is stale as a whole and
  // the commands go once more over a fresh connection. Its replies may also just have come too
  // late, the commands run: the caller learns that they were resent (the store's commit then
  // recognises its own write instead of taking it for another replica's).
  for (int attempt = 0;; ++attempt) {
    bool pooled = false;
    RedisContextPtr c;
    try {
      c = acquire(&pooled);
    } catch (const RedisDown& e) {
      if (attempt == 0) throw;
      throw RedisDown(e.what());  // the first try's commands went out: they may have run
    }
    if (resent) *resent = attempt > 0;
    std::vector<RedisReplyPtr> replies = send_all(c.get(), n, make);
    if (replies.size() == n) {
      give_back(std::move(c));
      return replies;
    }
    const std::string why = c->errstr[0] ? std::string(c->errstr) : std::string("connection lost");
    drop_idle();
    if (!pooled || attempt > 0) throw RedisDown(why);
  }
}

std::vector<RedisReplyPtr> RedisPool::send_all(redisContext* c, size_t n, const MakeCommand& make) {
  constexpr size_t kWriteEvery = 8;  // commands: Redis starts on them while the next are made
  std::vector<const char*> argv;
  std::vector<size_t> len;
  std::string scratch;
  for (size_t i = 0; i < n; ++i) {
    const Command args = make(i, scratch);
    argv.clear();
    len.clear();
    for (const auto& a : args) {
      argv.push_back(a.data());
      len.push_back(a.size());
    }
    if (redisAppendCommandArgv(c, static_cast<int>(argv.size()), argv.data(), len.data()) != REDIS_OK) return {};
    int written_all = 0;
    if ((i + 1) % kWriteEvery == 0 && redisBufferWrite(c, &written_all) != REDIS_OK) return {};
  }
  std::vector<RedisReplyPtr> replies;  // fewer than commands: the connection failed
  replies.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    void* reply = nullptr;
    if (redisGetReply(c, &reply) != REDIS_OK || reply == nullptr) break;
    replies.emplace_back(static_cast<redisReply*>(reply));
  }
  return replies;
}

void RedisPool::drop_idle() {
  std::lock_guard<std::mutex> lock(mu_);
  idle_.clear();
}

}  // namespace rnnserve
