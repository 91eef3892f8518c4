#include "redis_store.h"

#include "memory_store.h"
#include "text.h"

namespace rnnserve {

namespace {

constexpr size_t kMaxSessionIdLength = 256;
constexpr double kCommandTimeoutS = 2.0;
const std::string kPrefix = "rnnserve:s:";  // + session id: the session's record
const std::string kLive = "rnnserve:live";  // sorted set: session id -> idle deadline (ms, Redis's clock)
const std::string kGone = "rnnserve:gone";  // sorted set: expired ids, so a late step hears "expired"
const std::string kTombstones = "65536";

// Redis's own clock, so every replica agrees on deadlines.
const std::string kLuaNow = R"(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function sweep(live, gone, keep)
  local old = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, 1000)
  if #old == 0 then return 0 end
  for _, id in ipairs(old) do redis.call('ZADD', gone, now, id) end
  redis.call('ZREM', live, unpack(old))
  redis.call('ZREMRANGEBYRANK', gone, 0, -tonumber(keep) - 1)
  return #old
end
)";

// KEYS: record, live, gone. ARGV: id, record, ttl ms, capacity, client-chosen id (1/0), tombstones.
// -1: a client-chosen id is already open; -2: capacity full; 0: opened.
const std::string kOpen = kLuaNow + R"(
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  sweep(KEYS[2], KEYS[3], ARGV[6])
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return -2 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 0
)";

// The compare-and-set of a batch. KEYS: n records, then live. ARGV: ttl ms, then per record: id,
// the index the step ran as (16 hex digits), the new record. Per record: 1 written; 0 no such
// session; otherwise the record as stored (another replica moved it on, or it is not ours).
const std::string kCommit = kLuaNow + R"(
local ttl = tonumber(ARGV[1])
local n = #KEYS - 1
local out, live = {}, {}
for i = 1, n do
  local a = 2 + (i - 1) * 3
  local head = redis.call('GETRANGE', KEYS[i], 0, 23)  -- magic, version and index only
  if head == '' then
    out[i] = 0
  elseif string.sub(head, 1, 5) ~= 'RNSS\1' or string.sub(head, 9, 24) ~= ARGV[a + 1] then
    out[i] = redis.call('GET', KEYS[i])
  else
    redis.call('SET', KEYS[i], ARGV[a + 2], 'PX', ttl)
    live[#live + 1] = now + ttl
    live[#live + 1] = ARGV[a]
    out[i] = 1
  end
end
if #live > 0 then redis.call('ZADD', KEYS[n + 1], unpack(live)) end
return out
)";

// KEYS: record, live. ARGV: id, record, ttl ms. 1 written, 0 no such session.
const std::string kSave = kLuaNow + R"(
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
)";

// KEYS: record, live. ARGV: id. The record as it was (nil: there was none).
const std::string kClose = R"(
local cur = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return cur
)";

// KEYS: live, gone. ARGV: id. 1: the id expired; 0: never opened (or closed).
const std::string kMissing = R"(
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 1 end
return 0
)";

// KEYS: live, gone. ARGV: tombstones. How many sessions expired since the last sweep.
const std::string kSweep = kLuaNow + "return sweep(KEYS[1], KEYS[2], ARGV[1])\n";

std::string key_of(const std::string& id) { return kPrefix + id; }

std::string reply_text(const redisReply& r) { return std::string(r.str, r.len); }

}  // namespace

RedisStore::RedisStore(const std::string& url, double ttl_s, size_t max_sessions, ModelOf model_of,
                       EvictHook on_evict)
    : redis_(parse_redis_url(url), kCommandTimeoutS),
      ttl_s_(ttl_s),
      ttl_ns_(static_cast<int64_t>(ttl_s * 1e9)),
      ttl_ms_(std::to_string(std::max<int64_t>(1, static_cast<int64_t>(ttl_s * 1000)))),
      max_sessions_(max_sessions),
      model_of_(std::move(model_of)),
      on_evict_(std::move(on_evict)) {
  try {
    auto pong = redis_.command({"PING"});
    if (pong->type == REDIS_REPLY_ERROR) throw RedisDown(reply_text(*pong));
  } catch (const RedisDown& e) {
    throw std::runtime_error("the session store " + url + " cannot be reached: " + e.what() +
                             " (start Redis there, or serve with --session-store memory)");
  }
}

Error RedisStore::unavailable(const std::string& what, const std::exception& e) const {
  return Error::of(ErrorKind::kUnavailable, "session store unavailable (" + redis_.address().url + ": " + e.what() +
                                                "): could not " + what + "; no state was changed, retry");
}

std::string RedisStore::record_of(const Session& s) const {
  return encode_record(s.model->name, s.model->version, s.next_index, s.last.get(), s.state);
}

Result<SessionPtr> RedisStore::open(ModelPtr model, const std::string& client_id, const SessionRecord* from) {
  std::string id = client_id.empty() ? new_session_id() : client_id;
  if (id.size() > kMaxSessionIdLength) {
    return Error::invalid("session id must be 1.." + std::to_string(kMaxSessionIdLength) + " characters",
                          "session_id");
  }
  auto s = std::make_shared<Session>(id, model);
  if (from) s->restore(*from);
  const std::string record = record_of(*s);  // nobody else has it yet
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kOpen, "3", key_of(id), kLive, kGone, id, record, ttl_ms_,
                        std::to_string(max_sessions_), client_id.empty() ? "0" : "1", kTombstones});
  } catch (const RedisDown& e) {
    return unavailable("open a session", e);
  }
  if (r->type != REDIS_REPLY_INTEGER) {
    return unavailable("open a session", RedisDown(r->type == REDIS_REPLY_ERROR ? reply_text(*r) : "odd reply"));
  }
  if (r->integer == -1) return Error::of(ErrorKind::kSessionExists, "session " + py_repr(id) + " is already open");
  if (r->integer == -2) {
    return Error::of(ErrorKind::kCapacityExhausted,
                     "session capacity full (" + std::to_string(max_sessions_) +
                         " open sessions); close idle sessions or retry later");
  }
  cache(s);
  return s;
}

void RedisStore::cache(const SessionPtr& s) {
  std::lock_guard<std::mutex> lock(mu_);
  cached_[s->id] = s;
}

void RedisStore::forget(const std::string& id) {
  SessionPtr s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cached_.find(id);
    if (it == cached_.end()) return;
    s = it->second;
    cached_.erase(it);
  }
  std::lock_guard<std::mutex> lock(s->mu);
  s->closed = true;  // a step in flight still answers; nobody finds it again
}

Result<SessionPtr> RedisStore::get(const std::string& id) {
  const int64_t now = now_ns();
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cached_.find(id);
    if (it != cached_.end() && now - it->second->last_used_ns.load(std::memory_order_relaxed) <= ttl_ns_) {
      it->second->last_used_ns.store(now, std::memory_order_relaxed);
      return it->second;
    }
  }
  return read_through(id);
}

Result<SessionPtr> RedisStore::read_through(const std::string& id) {
  RedisReplyPtr r;
  try {
    r = redis_.command({"GET", key_of(id)});
  } catch (const RedisDown& e) {
    return unavailable("read session " + py_repr(id), e);
  }
  if (r->type == REDIS_REPLY_NIL) return missing(id);
  if (r->type != REDIS_REPLY_STRING) return unavailable("read session " + py_repr(id), RedisDown("odd reply"));
  auto record = decode_record(reply_text(*r), id);
  if (!record.ok()) return record.error();
  auto model = model_of_(record.value().model, record.value().version);
  if (!model.ok()) {
    return Error::of(model.error().kind, "session " + py_repr(id) + " runs on a model this server does not serve: " +
                                             model.error().message);
  }
  if (!record_fits(record.value(), *model.value())) {
    return Error::of(ErrorKind::kInternal, "session " + py_repr(id) + ": its record in the session store holds " +
                                               std::to_string(record.value().state.size()) + " state values, " +
                                               model.value()->key() + " has " +
                                               std::to_string(model.value()->state_floats));
  }
  auto s = std::make_shared<Session>(id, model.value());
  adopt(*s, std::move(record.value()));
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, inserted] = cached_.try_emplace(id, s);
  const int64_t now = now_ns();
  if (!inserted && now - it->second->last_used_ns.load(std::memory_order_relaxed) > ttl_ns_) it->second = s;
  it->second->last_used_ns.store(now, std::memory_order_relaxed);
  return it->second;  // another call that read it through at the same time shares one gate
}

void RedisStore::adopt(Session& s, SessionRecord record) {
  std::lock_guard<std::mutex> lock(s.mu);
  s.state = std::move(record.state);
  s.next_index = record.next_index;
  s.last = std::move(record.last);
}

Error RedisStore::missing(const std::string& id) {
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kMissing, "2", kLive, kGone, id});
  } catch (const RedisDown& e) {
    return unavailable("look up session " + py_repr(id), e);
  }
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 1) {
    return Error::of(ErrorKind::kSessionExpired,
                     "session " + py_repr(id) + " expired after " + py_g(ttl_s_) + " s idle; open a new one");
  }
  return Error::of(ErrorKind::kSessionNotFound, "unknown session " + py_repr(id) + " (never opened or closed)");
}

std::optional<Error> RedisStore::close(const std::string& id) {
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kClose, "2", key_of(id), kLive, id});
  } catch (const RedisDown& e) {
    return unavailable("close session " + py_repr(id), e);
  }
  forget(id);
  if (r->type != REDIS_REPLY_STRING) return missing(id);
  auto record = decode_record(reply_text(*r), id);  // a corrupt record is closed all the same
  if (record.ok() && on_evict_) on_evict_(record.value().model, "closed");
  return std::nullopt;
}

std::vector<std::optional<Error>> RedisStore::commit(std::vector<Commit>& commits) {
  std::vector<std::optional<Error>> out(commits.size());
  std::vector<size_t> sent;
  std::vector<std::string> keys, triples;
  for (size_t i = 0; i < commits.size(); ++i) {
    Commit& c = commits[i];
    std::lock_guard<std::mutex> lock(c.session->mu);
    if (c.session->closed) {  // closed while it ran: the step answers, nothing is kept
      c.session->state.swap(c.state);
      continue;
    }
    sent.push_back(i);
    keys.push_back(key_of(c.session->id));
    triples.push_back(c.session->id);
    triples.push_back(index_text(c.index));
    triples.push_back(encode_record(c.session->model->name, c.session->model->version, c.index + 1,
                                    c.reply.get(), c.state));
  }
  if (sent.empty()) return out;
  std::vector<std::string_view> args = {"EVAL", kCommit};
  const std::string numkeys = std::to_string(keys.size() + 1);
  args.push_back(numkeys);
  for (const auto& k : keys) args.push_back(k);
  args.push_back(kLive);
  args.push_back(ttl_ms_);
  for (const auto& t : triples) args.push_back(t);
  RedisReplyPtr r;
  try {
    r = redis_.command(args);
    if (r->type != REDIS_REPLY_ARRAY || r->elements != sent.size()) {
      throw RedisDown(r->type == REDIS_REPLY_ERROR ? reply_text(*r) : "odd reply");
    }
  } catch (const RedisDown& e) {
    for (size_t i : sent) out[i] = unavailable("record this step", e);
    return out;
  }
  for (size_t k = 0; k < sent.size(); ++k) out[sent[k]] = settle(commits[sent[k]], *r->element[k]);
  return out;
}

std::optional<Error> RedisStore::settle(Commit& c, const redisReply& outcome) {
  Session& s = *c.session;
  if (outcome.type == REDIS_REPLY_INTEGER && outcome.integer == 1) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.state.swap(c.state);
    return std::nullopt;
  }
  if (outcome.type != REDIS_REPLY_STRING) {
    forget(s.id);
    return missing(s.id);
  }
  auto stored = decode_record(reply_text(outcome), s.id);
  if (!stored.ok()) return stored.error();
  SessionRecord& now = stored.value();
  if (now.model != s.model->name || now.version != s.model->version || !record_fits(now, *s.model)) {
    forget(s.id);
    return Error::of(ErrorKind::kUnavailable, "session " + py_repr(s.id) +
                                                  " was reopened on another replica while this step ran; retry");
  }
  const uint64_t at = now.next_index;
  const bool same_step = at == c.index + 1 && now.last && now.last->step_index == c.index;
  if (same_step && c.explicit_index) c.reply = now.last;  // this very step ran elsewhere: a retry
  adopt(s, std::move(now));
  if (same_step && c.explicit_index) return std::nullopt;
  if (!c.explicit_index) {  // "the next step": run it again on the state just read
    c.stale = true;
    return std::nullopt;
  }
  std::string msg = "step_index " + std::to_string(c.index) + " is out of order for session " + py_repr(s.id) +
                    ": expected " + std::to_string(at) + " (another replica advanced it)";
  return Error::out_of_order(std::move(msg), at);
}

bool RedisStore::reload(Session& s) {
  RedisReplyPtr r;
  try {
    r = redis_.command({"GET", key_of(s.id)});
  } catch (const RedisDown&) {
    return false;  // the step answers from what this replica knows; its commit would fail anyway
  }
  if (r->type != REDIS_REPLY_STRING) return false;
  auto record = decode_record(reply_text(*r), s.id);
  if (!record.ok() || record.value().model != s.model->name || record.value().version != s.model->version ||
      !record_fits(record.value(), *s.model)) {
    return false;
  }
  adopt(s, std::move(record.value()));
  return true;
}

std::optional<Error> RedisStore::save(Session& s) {
  std::string record;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    record = record_of(s);
  }
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kSave, "2", key_of(s.id), kLive, s.id, record, ttl_ms_});
  } catch (const RedisDown& e) {
    return unavailable("record session " + py_repr(s.id), e);
  }
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 1) return std::nullopt;
  forget(s.id);
  return missing(s.id);
}

size_t RedisStore::sweep() {
  const int64_t now = now_ns();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = cached_.begin(); it != cached_.end();) {
      const bool idle = now - it->second->last_used_ns.load(std::memory_order_relaxed) > ttl_ns_;
      it = idle ? cached_.erase(it) : std::next(it);  // Redis keeps the session; this copy goes
    }
  }
  try {
    auto r = redis_.command({"EVAL", kSweep, "2", kLive, kGone, kTombstones});
    return r->type == REDIS_REPLY_INTEGER ? static_cast<size_t>(r->integer) : 0;
  } catch (const RedisDown&) {
    return 0;  // the next sweep catches up
  }
}

size_t RedisStore::count(const std::string& model_name) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [id, s] : cached_) n += s->model->name == model_name;
  return n;
}

size_t RedisStore::count_version(const ModelSpec& model) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [id, s] : cached_) n += s->model.get() == &model;
  return n;
}

size_t RedisStore::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_.size();
}

void RedisStore::close_all() {
  std::lock_guard<std::mutex> lock(mu_);
  cached_.clear();  // the sessions stay in Redis for the next replica (or this one, restarted)
}

}  // namespace rnnserve
