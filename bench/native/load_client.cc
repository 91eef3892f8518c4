// A closed-loop load client for rnnserve.v1 in C++ (gRPC callback API), so the client is not the
// bottleneck it is in Python: C sessions, each sending its next step as soon as the previous reply
// arrived, on one of three paths:
//   unary   Step after Step, one session per call
//   stream  one Session bidi stream per session, one message in flight on it
//   packed  StepMany with one PackedSteps block of --per-message sessions per message, one
//           message in flight per stream
//
//   load_client --target HOST:PORT --model NAME --features F --path unary|stream|packed
//               --sessions C [--per-message 64] [--warmup S] [--duration S] [--channels K]
//
// It opens the sessions first (OpenSession; the echo server fakes ids) and prints {"ready": C}.
// Then it runs --warmup seconds not counted and --duration seconds counted: a message counts when
// its reply arrives inside that window. Every reply is checked (the step index it answers; a
// packed reply's indexes and errors); a session stops at its first failure, which is counted. At
// the end it closes the sessions and prints one JSON object: steps/s, msgs/s, p50/p99 latency of a
// message round trip, errors.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "rnnserve/v1/rnnserve.grpc.pb.h"

namespace {

namespace rs = rnnserve::v1;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string target;
  std::string model;
  std::string path = "stream";
  int features = 1;
  int sessions = 1;
  int per_message = 64;
  double warmup = 0.5;
  double duration = 2.0;
  int channels = 2;
  bool close = true;
};

// ---- what every driver records ----------------------------------------------------------------

struct Window {
  Clock::time_point count_from;
  Clock::time_point end;
};

// One driver's tally; only its own callback chain touches it until it reports done.
struct Tally {
  int64_t steps = 0;
  std::vector<double> latencies_us;  // one per message answered inside the window
  int64_t errors = 0;
  std::string first_error;

  void Record(const Window& w, Clock::time_point t0, Clock::time_point t1, int steps_in_message) {
    if (t1 < w.count_from || t1 > w.end) return;
    steps += steps_in_message;
    latencies_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }

  void Fail(const std::string& what) {
    if (errors++ == 0) first_error = what;
  }
};

std::string StatusText(const grpc::Status& status) {
  return "gRPC " + std::to_string(status.error_code()) + ": " + status.error_message();
}

// Counts drivers still running; Wait returns when all are done or the deadline passed.
class Latch {
 public:
  explicit Latch(size_t count) : count_(count) {}

  void CountDown() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--count_ == 0) done_.notify_all();
  }

  bool Wait(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    return done_.wait_until(lock, deadline, [this] { return count_ == 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable done_;
  size_t count_;
};

rs::Input RandomInput(std::mt19937& rng, int features) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  rs::Input input;
  auto* f = input.mutable_features();
  for (int i = 0; i < features; ++i) f->add_values(uniform(rng));
  f->set_steps(1);
  return input;
}

// ---- unary: Step after Step ----------------------------------------------------------------------

class UnaryDriver {
 public:
  UnaryDriver(rs::RnnServe::Stub* stub, const std::string& session_id, rs::Input input,
              const Window& window, Latch* latch)
      : stub_(stub), window_(window), latch_(latch) {
    request_.set_session_id(session_id);
    *request_.mutable_input() = std::move(input);
  }

  void Start() { Next(); }
  const Tally& tally() const { return tally_; }

 private:
  void Next() {
    if (Clock::now() >= window_.end) return latch_->CountDown();
    context_ = std::make_unique<grpc::ClientContext>();
    request_.set_step_index(next_index_);
    sent_at_ = Clock::now();
    stub_->async()->Step(context_.get(), &request_, &reply_,
                         [this](grpc::Status status) { OnReply(status); });
  }

  void OnReply(const grpc::Status& status) {
    const auto now = Clock::now();
    if (!status.ok()) {
      tally_.Fail("Step: " + StatusText(status));
      return latch_->CountDown();
    }
    if (reply_.step_index() != next_index_) {
      tally_.Fail("Step answered index " + std::to_string(reply_.step_index()) + ", sent " +
                  std::to_string(next_index_));
      return latch_->CountDown();
    }
    ++next_index_;
    tally_.Record(window_, sent_at_, now, 1);
    Next();
  }

  rs::RnnServe::Stub* stub_;
  Window window_;
  Latch* latch_;
  std::unique_ptr<grpc::ClientContext> context_;
  rs::StepRequest request_;
  rs::StepResponse reply_;
  uint64_t next_index_ = 0;
  Clock::time_point sent_at_;
  Tally tally_;
};

// ---- streams: one message in flight, the next sent when its reply and its write are done --------

template <class Request, class Reply>
class StreamDriver : public grpc::ClientBidiReactor<Request, Reply> {
 public:
  StreamDriver(const Window& window, Latch* latch, int steps_per_message)
      : window_(window), latch_(latch), steps_per_message_(steps_per_message) {}
  virtual ~StreamDriver() = default;

  const Tally& tally() const { return tally_; }

  void OnWriteDone(bool ok) override {
    if (ok) MessageDone();
    // a failed write ends the stream: OnDone reports its status
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      broken_ = true;  // the server ended the stream early; OnDone has the status
      return;
    }
    replied_at_ = Clock::now();
    std::string wrong = Check();
    if (!wrong.empty()) {
      tally_.Fail(wrong);
      broken_ = true;
      this->StartWritesDone();
      return;
    }
    MessageDone();
  }

  void OnDone(const grpc::Status& status) override {
    if (!status.ok()) tally_.Fail(StatusText(status));
    else if (broken_ && tally_.errors == 0) tally_.Fail("stream ended before its last reply");
    latch_->CountDown();
  }

 protected:
  void StartStream(grpc::ClientContext* context) {
    (void)context;
    Send();
    this->StartCall();
  }

  virtual void Prepare() = 0;              // the next message into request_
  virtual std::string Check() = 0;         // reply_ against what was sent; empty when right
  virtual void Advance() = 0;              // the sessions' next indexes

  Request request_;
  Reply reply_;

 private:
  void Send() {
    pending_.store(2);  // this message's write and its reply
    Prepare();
    sent_at_ = Clock::now();
    this->StartWrite(&request_);
    this->StartRead(&reply_);
  }

  void MessageDone() {
    if (pending_.fetch_sub(1) != 1) return;
    Advance();
    tally_.Record(window_, sent_at_, replied_at_, steps_per_message_);
    if (Clock::now() < window_.end) return Send();
    this->StartWritesDone();
  }

  Window window_;
  Latch* latch_;
  int steps_per_message_;
  std::atomic<int> pending_{0};
  Clock::time_point sent_at_, replied_at_;
  bool broken_ = false;
  Tally tally_;
};

class SessionDriver final : public StreamDriver<rs::StepRequest, rs::StepResponse> {
 public:
  SessionDriver(rs::RnnServe::Stub* stub, const std::string& session_id, rs::Input input,
                const Window& window, Latch* latch)
      : StreamDriver(window, latch, 1), stub_(stub) {
    request_.set_session_id(session_id);
    *request_.mutable_input() = std::move(input);
  }

  void Start() {
    stub_->async()->Session(&context_, this);
    StartStream(&context_);
  }

 private:
  void Prepare() override { request_.set_step_index(next_index_); }

  std::string Check() override {
    if (reply_.step_index() == next_index_) return "";
    return "Session answered index " + std::to_string(reply_.step_index()) + ", sent " +
           std::to_string(next_index_);
  }

  void Advance() override { ++next_index_; }

  rs::RnnServe::Stub* stub_;
  grpc::ClientContext context_;
  uint64_t next_index_ = 0;
};

class PackedDriver final : public StreamDriver<rs::StepManyRequest, rs::StepManyResponse> {
 public:
  PackedDriver(rs::RnnServe::Stub* stub, const std::string& model,
               const std::vector<std::string>& session_ids, int features, std::mt19937& rng,
               const Window& window, Latch* latch)
      : StreamDriver(window, latch, static_cast<int>(session_ids.size())), stub_(stub) {
    auto* block = request_.mutable_packed();
    block->set_model(model);
    for (const auto& id : session_ids) block->add_session_ids(id);
    block->mutable_step_indexes()->Resize(static_cast<int>(session_ids.size()), 0);
    block->set_steps(1);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    std::vector<float> x(session_ids.size() * features);  // (N, T=1, F)
    for (auto& v : x) v = uniform(rng);
    block->set_features(std::string(reinterpret_cast<const char*>(x.data()), 4 * x.size()));
  }

  void Start() {
    stub_->async()->StepMany(&context_, this);
    StartStream(&context_);
  }

 private:
  void Prepare() override {
    auto* indexes = request_.mutable_packed()->mutable_step_indexes();
    for (int i = 0; i < indexes->size(); ++i) indexes->Set(i, next_index_);
  }

  std::string Check() override {
    const auto& packed = reply_.packed();
    if (packed.errors_size() > 0) {
      const auto& e = packed.errors(0);
      return "packed entry " + std::to_string(e.position()) + " failed: " + e.error().code() +
             " " + e.error().message();
    }
    const auto& sent = request_.packed().step_indexes();
    if (packed.step_indexes_size() != sent.size()) {
      return "packed reply has " + std::to_string(packed.step_indexes_size()) + " indexes for " +
             std::to_string(sent.size()) + " entries";
    }
    for (int i = 0; i < sent.size(); ++i) {
      if (packed.step_indexes(i) != sent.Get(i)) {
        return "packed entry " + std::to_string(i) + " answered index " +
               std::to_string(packed.step_indexes(i)) + ", sent " + std::to_string(sent.Get(i));
      }
    }
    return "";
  }

  void Advance() override { ++next_index_; }  // every session of the block steps together

  rs::RnnServe::Stub* stub_;
  grpc::ClientContext context_;
  uint64_t next_index_ = 0;
};

// ---- sessions -----------------------------------------------------------------------------------

std::vector<std::unique_ptr<rs::RnnServe::Stub>> MakeStubs(const Options& o) {
  std::vector<std::unique_ptr<rs::RnnServe::Stub>> stubs;
  for (int i = 0; i < o.channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("rnnserve.bench.channel", i);  // distinct args: a connection of its own
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    auto channel = grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args);
    stubs.push_back(rs::RnnServe::NewStub(channel));
  }
  return stubs;
}

// Runs fn(i) for i in [0, count) on up to 16 threads (OpenSession/CloseSession are quick calls).
template <class Fn>
void ForEachInParallel(int count, Fn fn) {
  const int threads = std::max(1, std::min(16, count));
  std::atomic<int> next{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int i; (i = next.fetch_add(1)) < count;) fn(i);
    });
  }
  for (auto& thread : pool) thread.join();
}

std::vector<std::string> OpenSessions(const Options& o,
                                      std::vector<std::unique_ptr<rs::RnnServe::Stub>>& stubs) {
  std::vector<std::string> ids(o.sessions);
  std::mutex mu;
  std::string failure;
  ForEachInParallel(o.sessions, [&](int i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    rs::OpenSessionRequest request;
    request.set_model(o.model);
    rs::SessionInfo info;
    const grpc::Status status = stubs[i % stubs.size()]->OpenSession(&context, request, &info);
    std::lock_guard<std::mutex> lock(mu);
    if (status.ok()) ids[i] = info.session_id();
    else if (failure.empty()) failure = "OpenSession: " + StatusText(status);
  });
  if (!failure.empty()) throw std::runtime_error(failure);
  return ids;
}

void CloseSessions(const std::vector<std::string>& ids,
                   std::vector<std::unique_ptr<rs::RnnServe::Stub>>& stubs) {
  ForEachInParallel(static_cast<int>(ids.size()), [&](int i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    rs::CloseSessionRequest request;
    request.set_session_id(ids[i]);
    rs::CloseSessionResponse reply;
    (void)stubs[i % stubs.size()]->CloseSession(&context, request, &reply);  // best effort
  });
}

// ---- the run ------------------------------------------------------------------------------------

std::string JsonString(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out + "\"";
}

double Percentile(std::vector<double>& values, double q) {
  if (values.empty()) return 0.0;
  const size_t at = std::min(values.size() - 1, static_cast<size_t>(q * values.size()));
  std::nth_element(values.begin(), values.begin() + at, values.end());
  return values[at];
}

template <class Driver>
std::vector<Tally> RunDrivers(std::vector<std::unique_ptr<Driver>>& drivers, Latch& latch,
                              const Window& window) {
  for (auto& d : drivers) d->Start();
  if (!latch.Wait(window.end + std::chrono::seconds(60))) {
    // a server that stops answering: the reactors still belong to gRPC, so leave without them
    std::printf("{\"error\": \"the server stopped answering: drivers still waiting 60 s after "
                "the window\"}\n");
    std::fflush(stdout);
    std::_Exit(3);
  }
  std::vector<Tally> tallies;
  for (auto& d : drivers) tallies.push_back(d->tally());
  return tallies;
}

std::vector<Tally> Drive(const Options& o, std::vector<std::unique_ptr<rs::RnnServe::Stub>>& stubs,
                         const std::vector<std::string>& ids, const Window& window) {
  std::mt19937 rng(12345);
  const auto stub = [&](size_t i) { return stubs[i % stubs.size()].get(); };
  if (o.path == "unary" || o.path == "stream") {
    Latch latch(ids.size());
    if (o.path == "unary") {
      std::vector<std::unique_ptr<UnaryDriver>> drivers;
      for (size_t i = 0; i < ids.size(); ++i) {
        drivers.push_back(std::make_unique<UnaryDriver>(stub(i), ids[i],
                                                        RandomInput(rng, o.features), window,
                                                        &latch));
      }
      return RunDrivers(drivers, latch, window);
    }
    std::vector<std::unique_ptr<SessionDriver>> drivers;
    for (size_t i = 0; i < ids.size(); ++i) {
      drivers.push_back(std::make_unique<SessionDriver>(stub(i), ids[i],
                                                        RandomInput(rng, o.features), window,
                                                        &latch));
    }
    return RunDrivers(drivers, latch, window);
  }
  std::vector<std::unique_ptr<PackedDriver>> drivers;
  const size_t groups = (ids.size() + o.per_message - 1) / o.per_message;
  Latch latch(groups);
  for (size_t g = 0; g < groups; ++g) {
    const auto first = ids.begin() + g * o.per_message;
    const std::vector<std::string> group(first, std::min(first + o.per_message, ids.end()));
    drivers.push_back(
        std::make_unique<PackedDriver>(stub(g), o.model, group, o.features, rng, window, &latch));
  }
  return RunDrivers(drivers, latch, window);
}

std::string Report(const Options& o, const std::vector<Tally>& tallies, double open_seconds) {
  int64_t steps = 0, errors = 0;
  std::string first_error;
  std::vector<double> latencies;
  for (const auto& t : tallies) {
    steps += t.steps;
    errors += t.errors;
    if (first_error.empty()) first_error = t.first_error;
    latencies.insert(latencies.end(), t.latencies_us.begin(), t.latencies_us.end());
  }
  const size_t messages = latencies.size();
  std::ostringstream out;
  out << "{\"path\": " << JsonString(o.path) << ", \"sessions\": " << o.sessions
      << ", \"per_message\": " << (o.path == "packed" ? std::min(o.per_message, o.sessions) : 1)
      << ", \"seconds\": " << o.duration << ", \"steps\": " << steps
      << ", \"messages\": " << messages << ", \"steps_per_s\": " << steps / o.duration
      << ", \"msgs_per_s\": " << messages / o.duration
      << ", \"p50_us\": " << Percentile(latencies, 0.50)
      << ", \"p99_us\": " << Percentile(latencies, 0.99) << ", \"errors\": " << errors
      << ", \"first_error\": " << JsonString(first_error) << ", \"open_seconds\": " << open_seconds
      << "}";
  return out.str();
}

int Run(const Options& o) {
  auto stubs = MakeStubs(o);
  const auto opening = Clock::now();
  const std::vector<std::string> ids = OpenSessions(o, stubs);
  const double open_seconds = std::chrono::duration<double>(Clock::now() - opening).count();
  std::printf("{\"ready\": %d}\n", o.sessions);
  std::fflush(stdout);
  const auto start = Clock::now();
  const auto seconds = [](double s) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
  };
  const Window window{start + seconds(o.warmup), start + seconds(o.warmup + o.duration)};
  const std::vector<Tally> tallies = Drive(o, stubs, ids, window);
  if (o.close) CloseSessions(ids, stubs);
  std::printf("%s\n", Report(o, tallies, open_seconds).c_str());
  return 0;
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--no-close") {
      o.close = false;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--target") o.target = value;
    else if (flag == "--model") o.model = value;
    else if (flag == "--path") o.path = value;
    else if (flag == "--features") o.features = std::stoi(value);
    else if (flag == "--sessions") o.sessions = std::stoi(value);
    else if (flag == "--per-message") o.per_message = std::stoi(value);
    else if (flag == "--warmup") o.warmup = std::stod(value);
    else if (flag == "--duration") o.duration = std::stod(value);
    else if (flag == "--channels") o.channels = std::stoi(value);
    else throw std::invalid_argument("unknown flag " + flag);
  }
  if (o.target.empty() || o.model.empty()) {
    throw std::invalid_argument("--target and --model are required");
  }
  if (o.path != "unary" && o.path != "stream" && o.path != "packed") {
    throw std::invalid_argument("--path must be unary, stream or packed, got " + o.path);
  }
  if (o.features < 1 || o.sessions < 1 || o.per_message < 1 || o.channels < 1) {
    throw std::invalid_argument("--features, --sessions, --per-message, --channels must be >= 1");
  }
  if (!(o.warmup >= 0) || !(o.duration > 0)) {
    throw std::invalid_argument("--warmup must be >= 0 and --duration > 0");
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseOptions(argc, argv));
  } catch (const std::exception& e) {
    std::printf("{\"error\": %s}\n", JsonString(e.what()).c_str());
    return 2;
  }
}
