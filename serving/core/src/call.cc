#include "call.h"

#include <google/protobuf/stubs/logging.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

#include "core.h"
#include "session.h"

namespace rnnserve {

namespace {

const char kAuthMetadata[] = "authorization";

std::string sha256(const std::string& text) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest);
  return std::string(reinterpret_cast<const char*>(digest), sizeof digest);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string trimmed(const std::string& s) {
  const auto first = s.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t") - first + 1);
}

std::string short_name(const std::string& method) { return method.substr(method.rfind('/') + 1); }

// 2026-12-04T20:31:07.123Z
std::string iso_now() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm utc{};
  gmtime_r(&secs, &utc);
  char buf[96];  // room for any int the format could print, so -Wformat-truncation can prove it fits
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", utc.tm_year + 1900, utc.tm_mon + 1,
                utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, static_cast<int>(ms));
  return buf;
}

}  // namespace

TokenTable::TokenTable(std::vector<std::pair<std::string, std::string>> entries) : entries_(std::move(entries)) {}

std::pair<std::string, std::optional<Error>> TokenTable::identify(const grpc::ServerContextBase& ctx) const {
  const auto found = ctx.client_metadata().equal_range(kAuthMetadata);
  const auto count = std::distance(found.first, found.second);
  auto refuse = [](std::string why) { return std::make_pair(std::string(), Error::of(ErrorKind::kUnauthenticated, std::move(why))); };
  if (count == 0) return refuse("missing credentials: send the metadata 'authorization: Bearer <token>'");
  if (count > 1) return refuse("more than one 'authorization' metadata entry");
  const std::string value(found.first->second.data(), found.first->second.size());
  const auto space = value.find(' ');
  const std::string token = space == std::string::npos ? "" : trimmed(value.substr(space + 1));
  if (space == std::string::npos || lower(value.substr(0, space)) != "bearer" || token.empty()) {
    return refuse("'authorization' metadata must be 'Bearer <token>'");
  }
  const std::string digest = sha256(token);
  std::string identity;
  for (const auto& [known, who] : entries_) {  // every entry, always: no early exit
    if (CRYPTO_memcmp(known.data(), digest.data(), digest.size()) == 0) identity = who;
  }
  if (identity.empty()) return refuse("invalid bearer token");
  return {identity, std::nullopt};
}

void log_line(const char* level, const std::string& message) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm local{};
  localtime_r(&secs, &local);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &local);
  std::fprintf(stderr, "%s,%03d %s serving.core: %s\n", stamp, static_cast<int>(ms), level, message.c_str());
}

void route_protobuf_logs() {
  static std::once_flag once;
  std::call_once(once, [] {
    google::protobuf::SetLogHandler([](google::protobuf::LogLevel level, const char* file, int line,
                                       const std::string& message) {
      static RateLimitedLog log;  // every 10 s a site, with the count of what it held back
      if (level < google::protobuf::LOGLEVEL_WARNING) return;
      log.warn(std::string(file) + ":" + std::to_string(line), "protobuf: " + message);
    });
  });
}

void RateLimitedLog::warn(const std::string& key, const std::string& message) {
  const int64_t now = now_ns();
  uint64_t count = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find_if(seen_.begin(), seen_.end(), [&key](const auto& e) { return e.first == key; });
    if (it == seen_.end()) it = seen_.insert(seen_.end(), {key, {now - every_ns_, 0}});
    it->second.second += 1;
    if (now - it->second.first < every_ns_) return;
    count = it->second.second;
    it->second = {now, 0};
  }
  log_line("WARNING", message + " (" + std::to_string(count) + " of these since the last report)");
}

void access_log_line(const Core& core, const std::string& method, const std::string& model, grpc::StatusCode code,
                     int64_t started_ns) {
  if (!core.config().access_log) return;
  const auto us = (now_ns() - started_ns) / 1000;
  const std::string line = iso_now() + " grpc " + method + " model=" + model + " status=" + code_name(code) +
                           " us=" + std::to_string(us);
  if (core.config().access_sink) {
    core.config().access_sink(line);
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

CallScope::CallScope(Core* core, grpc::CallbackServerContext* ctx, std::string method, bool admit_now)
    : core_(core), method_(std::move(method)), model_("-"), started_ns_(now_ns()) {
  if (core_->tokens().enabled()) {
    auto [identity, problem] = core_->tokens().identify(*ctx);
    if (problem) {
      refused_ = problem;
      core_->refusals().warn("unauthenticated", "refused an unauthenticated RPC; latest: " + method_ + " (" +
                                                    problem->message + ")");
      return;
    }
    identity_ = identity;
  }
  if (admit_now) refused_ = admit();
}

std::optional<Error> CallScope::admit() {
  if (!core_->admit()) {
    const auto limit = std::to_string(core_->config().max_concurrent_rpcs);
    core_->metrics().refused(short_name(method_), "overloaded");
    core_->refusals().warn("overloaded", "server overloaded: refused " + method_);
    return Error::of(ErrorKind::kCapacityExhausted, "server overloaded: " + limit + " RPCs in flight, the limit is " +
                                                        limit + " (max_concurrent_rpcs); retry later");
  }
  admitted_ = true;
  return std::nullopt;
}

CallScope::~CallScope() {
  if (!finished_) finish(grpc::StatusCode::CANCELLED);
}

void CallScope::finish(grpc::StatusCode code) {
  if (finished_) return;
  finished_ = true;
  if (admitted_) core_->release();
  core_->metrics().request(short_name(method_), code_name(code));
  access_log_line(*core_, method_, model_, code, started_ns_);
}

}  // namespace rnnserve
