#include "memory_store.h"

#include <random>

#include "text.h"

namespace rnnserve {

namespace {
constexpr size_t kMaxSessionIdLength = 256;
}

std::string new_session_id() {
  static const char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  thread_local std::random_device entropy;  // the kernel's CSPRNG: ids must not be guessable
  unsigned char bytes[16];
  for (size_t i = 0; i < sizeof bytes; i += 4) {
    const uint32_t r = entropy();
    for (size_t k = 0; k < 4; ++k) bytes[i + k] = static_cast<unsigned char>(r >> (8 * k));
  }
  std::string id;
  uint32_t acc = 0;
  int bits = 0;
  for (unsigned char b : bytes) {
    acc = (acc << 8) | b;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      id.push_back(kAlphabet[(acc >> bits) & 0x3F]);
    }
  }
  if (bits > 0) id.push_back(kAlphabet[(acc << (6 - bits)) & 0x3F]);
  return id;  // 22 characters
}

MemoryStore::MemoryStore(double ttl_s, size_t max_sessions, EvictHook on_evict, size_t tombstones)
    : ttl_s_(ttl_s),
      ttl_ns_(static_cast<int64_t>(ttl_s * 1e9)),
      max_sessions_(max_sessions),
      max_tombstones_(tombstones),
      on_evict_(std::move(on_evict)) {}

std::optional<Error> MemoryStore::check_client_id(const std::string& id) const {
  if (id.empty() || id.size() > kMaxSessionIdLength) {
    return Error::invalid("session id must be 1.." + std::to_string(kMaxSessionIdLength) + " characters",
                          "session_id");
  }
  if (live_.count(id)) return Error::of(ErrorKind::kSessionExists, "session " + py_repr(id) + " is already open");
  return std::nullopt;
}

Result<SessionPtr> MemoryStore::open(ModelPtr model, const std::string& client_id, const SessionRecord* from) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string id = client_id;
  if (id.empty()) {
    id = new_session_id();
  } else if (auto err = check_client_id(id)) {
    return *err;
  }
  if (live_.size() >= max_sessions_ && (sweep_locked(), live_.size() >= max_sessions_)) {
    return Error::of(ErrorKind::kCapacityExhausted,
                     "session capacity full (" + std::to_string(max_sessions_) +
                         " open sessions); close idle sessions or retry later");
  }
  auto session = std::make_shared<Session>(id, model);
  if (from) session->restore(*from);  // before anyone can find it
  live_[id] = session;
  expired_.erase(id);
  version_counts_[model.get()] += 1;
  return session;
}

bool MemoryStore::idle(Session& s, int64_t now) const {
  std::lock_guard<std::mutex> lock(s.mu);
  return !s.busy && now - s.last_used_ns.load(std::memory_order_relaxed) > ttl_ns_;
}

Result<SessionPtr> MemoryStore::get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(id);
  const int64_t now = now_ns();
  if (it == live_.end() || idle(*it->second, now)) return missing(id);
  it->second->last_used_ns.store(now, std::memory_order_relaxed);
  return it->second;
}

Error MemoryStore::missing(const std::string& id) {
  if (live_.count(id)) evict(id, "expired");
  if (expired_.count(id)) {
    return Error::of(ErrorKind::kSessionExpired, "session " + py_repr(id) + " expired after " +
                                                     py_g(ttl_s_) + " s idle; open a new one");
  }
  return Error::of(ErrorKind::kSessionNotFound,
                   "unknown session " + py_repr(id) + " (never opened or closed)");
}

std::optional<Error> MemoryStore::close(const std::string& id) {
  SessionPtr s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(id);
    if (it == live_.end() || idle(*it->second, now_ns())) return missing(id);
    s = it->second;
    remove(s);
  }
  if (on_evict_) on_evict_(s->model->name, "closed");
  return std::nullopt;
}

std::optional<Error> MemoryStore::close_opening(Session& s) {
  SessionPtr live;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(s.id);
    if (it == live_.end()) return missing(s.id);
    if (it->second.get() != &s) return session_reopened(s.id);
    live = it->second;
    remove(live);
  }
  if (on_evict_) on_evict_(live->model->name, "closed");
  return std::nullopt;
}

void MemoryStore::evict(const std::string& id, const char* why) {
  SessionPtr s = live_.at(id);
  remove(s);
  expired_.insert(id);
  expired_order_.push_back(id);
  while (expired_order_.size() > max_tombstones_) {
    expired_.erase(expired_order_.front());
    expired_order_.pop_front();
  }
  if (on_evict_) on_evict_(s->model->name, why);
}

void MemoryStore::remove(const SessionPtr& s) {
  live_.erase(s->id);
  auto version = version_counts_.find(s->model.get());
  if (--version->second == 0) version_counts_.erase(version);  // a freed version leaves no key behind
  std::lock_guard<std::mutex> lock(s->mu);
  s->closed = true;  // a step in flight still commits into it; nobody finds it again
}

std::vector<std::optional<Error>> MemoryStore::commit(std::vector<Commit>& commits) {
  for (auto& c : commits) c.session->state.swap(c.state);  // the sessions are the record
  return std::vector<std::optional<Error>>(commits.size());
}

size_t MemoryStore::sweep() {
  std::lock_guard<std::mutex> lock(mu_);
  return sweep_locked();
}

size_t MemoryStore::sweep_locked() {
  const int64_t now = now_ns();
  std::vector<std::string> idle_ids;
  for (auto& [id, s] : live_) {
    if (idle(*s, now)) idle_ids.push_back(id);
  }
  for (const auto& id : idle_ids) evict(id, "expired");
  return idle_ids.size();
}

size_t MemoryStore::count(const std::string& model_name) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;  // a handful of versions: a pass beats a second count to keep in step
  for (const auto& [model, live] : version_counts_) n += model->name == model_name ? live : 0;
  return n;
}

size_t MemoryStore::count_version(const ModelSpec& model) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = version_counts_.find(&model);
  return it == version_counts_.end() ? 0 : it->second;
}

std::unordered_map<const ModelSpec*, size_t> MemoryStore::count_by_version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return version_counts_;
}

size_t MemoryStore::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_.size();
}

void MemoryStore::close_all() {
  std::lock_guard<std::mutex> lock(mu_);
  while (!live_.empty()) {
    const SessionPtr s = live_.begin()->second;  // a copy: remove() erases the map's own
    remove(s);
  }
}

}  // namespace rnnserve
