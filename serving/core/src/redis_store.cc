#include "redis_store.h"

#include <random>

#include "memory_store.h"
#include "text.h"

namespace rnnserve {

namespace {

constexpr size_t kMaxSessionIdLength = 256;
constexpr double kCommandTimeoutS = 2.0;
const std::string kPrefix = "rnnserve:s:";  // + session id: the session's record
const std::string kStaged = "rnnserve:w:";  // + replica nonce + ":" + write number + ":" + session id
const std::string kLive = "rnnserve:live";  // sorted set: session id -> idle deadline (ms, Redis's clock)
const std::string kGone = "rnnserve:gone";  // sorted set: expired ids, so a late step hears "expired"
const std::string kTombstones = "65536";
constexpr int kSweepBatch = 1000;  // live-set entries one sweep script call looks at
constexpr int kMaxSweepCalls = 1000;  // per sweep: time-boxes a backlog, the next sweep goes on

// Redis's own clock, so every replica agrees on deadlines. A live set's score is a deadline no
// later than the record's own expiry (a step pushes the record's expiry back, not the score), so
// the sweep asks the record: still there, it is scored again by its remaining time to live.
const std::string kLuaNow = R"(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function sweep(live, gone, keep, prefix, batch)
  local old = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, tonumber(batch))
  local expired, alive = {}, {}
  for _, id in ipairs(old) do
    local left = redis.call('PTTL', prefix .. id)
    if left > 0 then
      alive[#alive + 1] = now + left
      alive[#alive + 1] = id
    else
      expired[#expired + 1] = id
      redis.call('ZADD', gone, now, id)
    end
  end
  if #alive > 0 then redis.call('ZADD', live, unpack(alive)) end
  if #expired > 0 then
    redis.call('ZREM', live, unpack(expired))
    redis.call('ZREMRANGEBYRANK', gone, 0, -tonumber(keep) - 1)
  end
  return {#expired, #old}
end
)";

// KEYS: record, live, gone. ARGV: id, record, ttl ms, capacity, client-chosen id (1/0), tombstones,
// record key prefix, sweep batch. -1: a client-chosen id is already open; -2: capacity full; 0: opened.
const std::string kOpen = kLuaNow + R"(
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local full = redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4])
for _ = 1, 10 do  -- sessions still live come first when due: look past them, up to 10 batches
  if not full then break end
  local looked = sweep(KEYS[2], KEYS[3], ARGV[6], ARGV[7], ARGV[8])[2]
  full = redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4])
  if looked < tonumber(ARGV[8]) then break end
end
if full then return -2 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 0
)";

// A record's stamp: its next step index and incarnation, 32 hex digits (a version 1 record has
// no incarnation: 0), read from its first 40 bytes; false when it is no session record.
const std::string kLuaStamp = R"(
local function stamp(head)
  local magic = string.sub(head, 1, 5)
  if magic == 'RNSS\2' then return string.sub(head, 9, 40) end
  if magic == 'RNSS\1' then return string.sub(head, 9, 24) .. '0000000000000000' end
  return false
end
)";

// The compare-and-set of a batch, after the batch's new records were SET (with the TTL) under
// staging keys in the same pipeline: the records never pass through Lua, which would copy and
// hash every byte of them. KEYS: n records, then their n staging keys. ARGV: per record, the
// stamp it must have (the index the step ran as and the session's incarnation). Per record: 1
// written (the staged record renamed over it, its TTL with it); 0 no such session; -1 the staged
// record is missing (its SET failed); otherwise the record as stored (another replica moved it
// on, another opening of the id replaced it, or it is not ours).
const std::string kCommit = kLuaStamp + R"(
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local head = redis.call('GETRANGE', KEYS[i], 0, 39)  -- magic, version, index and incarnation
  if head ~= '' and stamp(head) == ARGV[i] then
    local moved = redis.pcall('RENAME', KEYS[n + i], KEYS[i])
    out[i] = type(moved) == 'table' and moved.err and -1 or 1
  else
    redis.call('DEL', KEYS[n + i])
    out[i] = head == '' and 0 or redis.call('GET', KEYS[i])
  end
end
return out
)";

// KEYS: record, live. ARGV: id, record, ttl ms, incarnation (16 hex digits). 1 written, 0 no
// such session, -1 the id was opened again since (the record is another incarnation's).
const std::string kSave = kLuaNow + kLuaStamp + R"(
local head = redis.call('GETRANGE', KEYS[1], 0, 39)
if head == '' then return 0 end
local at = stamp(head)
if at and string.sub(at, 17, 32) ~= ARGV[4] then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
)";

// KEYS: record, live. ARGV: id, the incarnation to close ('': whichever is open). The record as
// it was (nil: there was none), or 0 when it is another incarnation's (then it stays).
const std::string kClose = kLuaStamp + R"(
local cur = redis.call('GET', KEYS[1])
if ARGV[2] ~= '' and cur and string.sub(stamp(cur) or '', 17, 32) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return cur
)";

// KEYS: live, gone. ARGV: id. 1: the id expired; 0: never opened (or closed).
const std::string kMissing = R"(
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 1 end
return 0
)";

// KEYS: live, gone. ARGV: tombstones, record key prefix, batch. {sessions expired, entries looked
// at}: a full batch means more may be due.
const std::string kSweep = kLuaNow + "return sweep(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])\n";

std::string key_of(const std::string& id) { return kPrefix + id; }

std::string reply_text(const redisReply& r) { return std::string(r.str, r.len); }

// A reply of a type the command never returns: Redis's error text, if it is one.
RedisDown odd(const redisReply& r) { return RedisDown(r.type == REDIS_REPLY_ERROR ? reply_text(r) : "odd reply"); }

// Not 0: that is a version 1 record's. The kernel's CSPRNG, as for session ids.
uint64_t new_incarnation() {
  thread_local std::random_device entropy;
  uint64_t n = 0;
  while (n == 0) n = (uint64_t{entropy()} << 32) | entropy();
  return n;
}

// The stamp a commit expects the record to have (see kLuaStamp).
std::string stamp_text(uint64_t index, uint64_t incarnation) { return index_text(index) + index_text(incarnation); }

// The record is of the opening this copy is (the same incarnation), on the model it runs.
bool same_opening(const SessionRecord& r, const Session& s) {
  return r.incarnation == s.incarnation && r.model == s.model->name && r.version == s.model->version &&
         record_fits(r, *s.model);
}

bool is_noscript(const redisReply& r) {
  return r.type == REDIS_REPLY_ERROR && std::string_view(r.str, r.len).substr(0, 8) == "NOSCRIPT";
}

}  // namespace

RedisStore::RedisStore(const std::string& url, double ttl_s, size_t max_sessions, ModelOf model_of,
                       EvictHook on_evict)
    : redis_(parse_redis_url(url), kCommandTimeoutS),
      ttl_s_(ttl_s),
      ttl_ns_(static_cast<int64_t>(ttl_s * 1e9)),
      ttl_ms_(std::to_string(std::max<int64_t>(1, static_cast<int64_t>(ttl_s * 1000)))),
      max_sessions_(max_sessions),
      model_of_(std::move(model_of)),
      on_evict_(std::move(on_evict)),
      staged_prefix_(kStaged + new_session_id() + ":") {
  try {
    auto pong = redis_.command({"PING"});
    if (pong->type == REDIS_REPLY_ERROR) throw RedisDown(reply_text(*pong));
    auto sha = redis_.command({"SCRIPT", "LOAD", kCommit});
    if (sha->type != REDIS_REPLY_STRING) throw RedisDown("SCRIPT LOAD: " + reply_text(*sha));
    commit_sha_ = reply_text(*sha);
  } catch (const RedisDown& e) {
    throw std::runtime_error("the session store " + url + " cannot be reached: " + e.what() +
                             " (start Redis there, or serve with --session-store memory)");
  }
}

Error RedisStore::down(const std::exception& e, const std::string& outcome) const {
  return Error::of(ErrorKind::kUnavailable,
                   "session store unavailable (" + redis_.address().url + ": " + e.what() + "): " + outcome);
}

Error RedisStore::unavailable(const std::string& what, const std::exception& e) const {
  return down(e, "could not " + what + "; no state was changed, retry");
}

Error RedisStore::unconfirmed(const RedisDown& e, bool numbered) const {
  if (!e.sent) return unavailable("record this step", e);
  const std::string retry = numbered ? "send it again with the same step_index, which is answered once"
                                     : "this step named no step_index, so sent again it may run twice";
  return down(e, "this step's write may have reached Redis but was not confirmed, so it may have been recorded; " +
                     retry);
}

std::string RedisStore::record_of(const Commit& c) {
  const Session& s = *c.session;  // its model and incarnation never change
  return encode_record(s.model->name, s.model->version, c.index + 1, s.incarnation, c.reply.get(), c.state);
}

std::string RedisStore::record_of(const Session& s) const {
  return encode_record(s.model->name, s.model->version, s.next_index, s.incarnation, s.last.get(), s.state);
}

Result<SessionPtr> RedisStore::open(ModelPtr model, const std::string& client_id, const SessionRecord* from) {
  std::string id = client_id.empty() ? new_session_id() : client_id;
  if (id.size() > kMaxSessionIdLength) {
    return Error::invalid("session id must be 1.." + std::to_string(kMaxSessionIdLength) + " characters",
                          "session_id");
  }
  auto s = std::make_shared<Session>(id, model);
  if (from) s->restore(*from);
  s->incarnation = new_incarnation();  // an imported session is a new opening too
  const std::string record = record_of(*s);  // nobody else has it yet
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kOpen, "3", key_of(id), kLive, kGone, id, record, ttl_ms_,
                        std::to_string(max_sessions_), client_id.empty() ? "0" : "1", kTombstones, kPrefix,
                        std::to_string(kSweepBatch)});
  } catch (const RedisDown& e) {
    return unavailable("open a session", e);
  }
  if (r->type != REDIS_REPLY_INTEGER) {
    return unavailable("open a session", odd(*r));
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

void RedisStore::forget(const std::string& id, std::optional<uint64_t> incarnation) {
  SessionPtr s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cached_.find(id);
    if (it == cached_.end() || (incarnation && it->second->incarnation != *incarnation)) return;
    s = it->second;
    cached_.erase(it);
  }
  std::lock_guard<std::mutex> lock(s->mu);
  s->closed = true;  // a step in flight still answers; nobody finds it again
}

// Only this object: a late write of a session closed meanwhile must not drop the session since
// reopened under its id from the cache (its steps would then be kept nowhere).
void RedisStore::forget(Session& s, bool reopened) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cached_.find(s.id);
    if (it != cached_.end() && it->second.get() == &s) cached_.erase(it);
  }
  std::lock_guard<std::mutex> lock(s.mu);
  s.reopened = s.reopened || (reopened && !s.closed);  // why it closed first is why it closed
  s.closed = true;
}

SessionPtr RedisStore::cached(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = cached_.find(id);
  return it == cached_.end() ? nullptr : it->second;
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
  if (r->type != REDIS_REPLY_STRING) return unavailable("read session " + py_repr(id), odd(*r));
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
  s->incarnation = record.value().incarnation;  // set once, before anyone shares it
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
  const SessionPtr held = cached(id);
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kClose, "2", key_of(id), kLive, id, ""});
  } catch (const RedisDown& e) {
    return unavailable("close session " + py_repr(id), e);
  }
  // The copy held before the script has no record now, whatever the script found; of the ones
  // cached since, only a copy of what was closed (a read in flight). An open of the id landing
  // between the script and here (on this replica or another) is a session that must stay.
  if (held) forget(*held);
  if (r->type != REDIS_REPLY_STRING) return missing(id);
  auto record = decode_record(reply_text(*r), id);  // a corrupt record is closed all the same
  forget(id, record.ok() ? std::optional<uint64_t>(record.value().incarnation) : std::nullopt);
  if (record.ok() && on_evict_) on_evict_(record.value().model, "closed");
  return std::nullopt;
}

std::optional<Error> RedisStore::close_opening(Session& s) {
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kClose, "2", key_of(s.id), kLive, s.id, index_text(s.incarnation)});
  } catch (const RedisDown& e) {
    return unavailable("close session " + py_repr(s.id), e);  // the record stays until its TTL
  }
  const bool reopened = r->type == REDIS_REPLY_INTEGER && r->integer == 0;
  forget(s, reopened);
  if (reopened) return session_reopened(s.id);
  if (r->type != REDIS_REPLY_STRING) return missing(s.id);
  auto record = decode_record(reply_text(*r), s.id);
  if (record.ok() && on_evict_) on_evict_(record.value().model, "closed");
  return std::nullopt;
}

std::vector<std::optional<Error>> RedisStore::commit(std::vector<Commit>& commits) {
  std::vector<std::optional<Error>> out(commits.size());
  std::vector<size_t> sent;
  std::vector<std::string> keys, staged, stamps;
  for (size_t i = 0; i < commits.size(); ++i) {
    Commit& c = commits[i];
    std::lock_guard<std::mutex> lock(c.session->mu);
    if (c.session->closed || c.session->transient) {  // the step answers, nothing is kept
      c.session->state.swap(c.state);
      continue;
    }
    sent.push_back(i);
    keys.push_back(key_of(c.session->id));
    // Two Session objects can share an id (an OIP restart, a close and an import): each record is
    // staged under its own key, so the compare-and-set never moves another write's record.
    const uint64_t write = next_write_.fetch_add(1, std::memory_order_relaxed);
    staged.push_back(staged_prefix_ + std::to_string(write) + ":" + c.session->id);
    stamps.push_back(stamp_text(c.index, c.session->incarnation));
  }
  if (sent.empty()) return out;
  std::vector<RedisReplyPtr> replies;
  bool resent = false;
  try {
    replies = write_batch(commits, sent, keys, staged, stamps, &resent);
  } catch (const RedisDown& e) {
    for (size_t i : sent) out[i] = unconfirmed(e, commits[i].explicit_index);
    return out;
  }
  const redisReply& outcomes = *replies.back();
  for (size_t k = 0; k < sent.size(); ++k) {
    const redisReply& outcome = *outcomes.element[k];
    if (outcome.type == REDIS_REPLY_INTEGER && outcome.integer == -1) {
      const redisReply& set = *replies[k];
      out[sent[k]] = unavailable("record this step", RedisDown(set.type == REDIS_REPLY_ERROR ? reply_text(set)
                                                                                            : "the record was not staged"));
      continue;
    }
    out[sent[k]] = settle(commits[sent[k]], outcome, resent);
  }
  return out;
}

// One round trip: each new record SET under its staging key with the TTL (encoded as it goes
// out, so Redis stores the first while the rest are encoded), then the compare-and-set script
// (by its SHA; sent whole once more if Redis lost its script cache).
std::vector<RedisReplyPtr> RedisStore::write_batch(const std::vector<Commit>& commits, const std::vector<size_t>& sent,
                                                   const std::vector<std::string>& keys,
                                                   const std::vector<std::string>& staged,
                                                   const std::vector<std::string>& stamps, bool* resent) {
  const size_t n = keys.size();
  const std::string numkeys = std::to_string(2 * n);
  RedisPool::Command cas = {"EVALSHA", commit_sha_, numkeys};
  for (const auto& key : keys) cas.push_back(key);
  for (const auto& key : staged) cas.push_back(key);
  for (const auto& stamp : stamps) cas.push_back(stamp);
  auto command = [&](size_t k, std::string& record) -> RedisPool::Command {
    if (k == n) return cas;
    record = record_of(commits[sent[k]]);  // its new state and reply are its own
    return {"SET", staged[k], record, "PX", ttl_ms_};
  };
  std::vector<RedisReplyPtr> replies = redis_.pipeline(n + 1, command, resent);
  if (is_noscript(*replies.back())) {
    cas[0] = "EVAL";
    cas[1] = kCommit;
    bool again = false;
    replies.back() = redis_.command(cas, &again);  // the staged records are still there
    *resent = *resent || again;
  }
  const redisReply& outcomes = *replies.back();
  if (outcomes.type != REDIS_REPLY_ARRAY || outcomes.elements != n) {
    throw odd(outcomes);
  }
  return replies;
}

std::optional<Error> RedisStore::settle(Commit& c, const redisReply& outcome, bool resent) {
  Session& s = *c.session;
  // A resent write finds the record its first try wrote (the replies were lost, not the write):
  // this step is done. Taken for another replica's, a step without an index would run again.
  const bool landed_first_time =
      resent && outcome.type == REDIS_REPLY_STRING && std::string_view(outcome.str, outcome.len) == record_of(c);
  if ((outcome.type == REDIS_REPLY_INTEGER && outcome.integer == 1) || landed_first_time) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.state.swap(c.state);
    return std::nullopt;
  }
  if (outcome.type != REDIS_REPLY_STRING) {
    forget(s);
    return missing(s.id);
  }
  auto stored = decode_record(reply_text(outcome), s.id);
  if (!stored.ok()) return stored.error();
  SessionRecord& now = stored.value();
  if (!same_opening(now, s)) {
    forget(s, /*reopened=*/true);
    return session_reopened(s.id);
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
  return Error::out_of_order("step_index", c.index, "session " + py_repr(s.id), at, "; another replica advanced it");
}

std::optional<Error> RedisStore::reload(Session& s) {
  RedisReplyPtr r;
  try {
    r = redis_.command({"GET", key_of(s.id)});
  } catch (const RedisDown& e) {
    return unavailable("re-read session " + py_repr(s.id), e);
  }
  if (r->type == REDIS_REPLY_NIL) {
    forget(s);
    return missing(s.id);
  }
  if (r->type != REDIS_REPLY_STRING) {
    return unavailable("re-read session " + py_repr(s.id), odd(*r));
  }
  auto record = decode_record(reply_text(*r), s.id);
  if (!record.ok()) return record.error();
  if (!same_opening(record.value(), s)) {
    forget(s, /*reopened=*/true);  // the next lookup reads the session the id is now
    return session_reopened(s.id);
  }
  adopt(s, std::move(record.value()));
  return std::nullopt;
}

std::optional<Error> RedisStore::save(Session& s) {
  std::string record;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    record = record_of(s);
  }
  RedisReplyPtr r;
  try {
    r = redis_.command({"EVAL", kSave, "2", key_of(s.id), kLive, s.id, record, ttl_ms_, index_text(s.incarnation)});
  } catch (const RedisDown& e) {
    return unavailable("record session " + py_repr(s.id), e);
  }
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 1) return std::nullopt;
  const bool reopened = r->type == REDIS_REPLY_INTEGER && r->integer == -1;
  forget(s, reopened);
  if (reopened) return session_reopened(s.id);
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
  // Every live session comes due once per TTL to be scored again, so with many sessions one
  // batch may not cover what is due: calls go on while they find a full batch.
  const std::string batch = std::to_string(kSweepBatch);
  size_t expired = 0;
  try {
    for (int call = 0; call < kMaxSweepCalls; ++call) {
      auto r = redis_.command({"EVAL", kSweep, "2", kLive, kGone, kTombstones, kPrefix, batch});
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) break;
      expired += static_cast<size_t>(r->element[0]->integer);
      if (r->element[1]->integer < kSweepBatch) break;
    }
  } catch (const RedisDown&) {
    // the next sweep catches up
  }
  return expired;
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

std::unordered_map<const ModelSpec*, size_t> RedisStore::count_by_version() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::unordered_map<const ModelSpec*, size_t> n;
  for (const auto& [id, s] : cached_) n[s->model.get()] += 1;
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
