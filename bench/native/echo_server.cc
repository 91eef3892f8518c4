// The transport floor in C++: rnnserve.v1 and the Open Inference Protocol (KServe v2 gRPC) served by
// gRPC's callback API, answering canned replies of the real server's shape without any model or
// session. Whatever a real server costs beyond this is its own work.
//
//   echo_server --canned DIR [--address 127.0.0.1:0] [--max-message-bytes N]
//
// DIR holds the replies of one model, serialized by bench/native_tools.py from the store's manifest
// with the Python server's own encoders: step_response.pb (one session, one time step),
// model_metadata.pb, model_config.pb and model_infer.pb (one row, one time step). Prints
// "echo: listening on HOST:PORT" once it serves; stops on SIGTERM or SIGINT.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <deque>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "inference/grpc_service.grpc.pb.h"
#include "rnnserve/v1/rnnserve.grpc.pb.h"

namespace {

namespace rs = rnnserve::v1;
namespace oip = inference;

// ---- what the echo answers ---------------------------------------------------------------------

template <class Message>
Message ReadMessage(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  Message message;
  if (!message.ParseFromString(bytes)) throw std::runtime_error(path + " is not a valid message");
  return message;
}

// One model's canned replies, read once; every handler copies from here.
struct Canned {
  explicit Canned(const std::string& dir)
      : step(ReadMessage<rs::StepResponse>(dir + "/step_response.pb")),
        metadata(ReadMessage<oip::ModelMetadataResponse>(dir + "/model_metadata.pb")),
        config(ReadMessage<oip::ModelConfigResponse>(dir + "/model_config.pb")),
        infer(ReadMessage<oip::ModelInferResponse>(dir + "/model_infer.pb")) {
    if (step.outputs_size() != 1) throw std::runtime_error("step_response.pb: want one time step");
    const auto& out = step.outputs(0);
    outputs = out.raw_size();
    classes = out.probabilities_size();
    const auto& shape = metadata.inputs(0).shape();
    features = shape.empty() ? 1 : std::max<int64_t>(1, shape[shape.size() - 1]);
  }

  const std::string& model() const { return metadata.name(); }

  rs::StepResponse step;  // one session, one time step
  oip::ModelMetadataResponse metadata;
  oip::ModelConfigResponse config;
  oip::ModelInferResponse infer;  // one row, one time step
  int outputs = 0;                // O: head outputs per time step
  int classes = 0;                // K: probabilities per time step (0 for regression)
  int64_t features = 1;           // F: input features per time step
};

int TimeSteps(const rs::StepRequest& request, int64_t features) {
  const auto& input = request.input();
  if (input.has_features()) {
    const auto& f = input.features();
    if (f.steps() > 0) return static_cast<int>(f.steps());
    return std::max(1, static_cast<int>(f.values_size() / features));
  }
  if (!input.text().empty()) return static_cast<int>(input.text().size());
  return std::max(1, input.tokens().ids_size());
}

void EchoStep(const Canned& canned, const std::string& session_id, const rs::StepRequest& request,
              rs::StepResponse* reply) {
  *reply = canned.step;
  reply->set_session_id(session_id);
  reply->set_step_index(request.step_index());
  for (int t = TimeSteps(request, canned.features); t > 1; --t) {
    *reply->add_outputs() = canned.step.outputs(0);
  }
}

void EchoPacked(const Canned& canned, const rs::PackedSteps& block, rs::PackedResults* reply) {
  const size_t rows = static_cast<size_t>(block.session_ids_size()) * std::max(1u, block.steps());
  reply->mutable_step_indexes()->CopyFrom(block.step_indexes());
  reply->set_raw(std::string(4 * rows * canned.outputs, '\0'));
  if (canned.classes > 0) {
    reply->set_probabilities(std::string(4 * rows * canned.classes, '\0'));
    reply->mutable_index()->Resize(static_cast<int>(rows), 0);
  }
  reply->set_expires_at(canned.step.expires_at());
}

// The canned one-row, one-step reply stretched to the request's (B, T, ...): each output's shape
// gets the request's leading dims and its contents repeated B*T times.
void EchoInfer(const Canned& canned, const oip::ModelInferRequest& request,
               oip::ModelInferResponse* reply) {
  *reply = canned.infer;
  reply->set_id(request.id());
  int64_t batch = 1, steps = 1;
  if (request.inputs_size() > 0) {
    const auto& shape = request.inputs(0).shape();
    if (shape.size() > 0) batch = std::max<int64_t>(1, shape[0]);
    if (shape.size() > 2) steps = std::max<int64_t>(1, shape[1]);
  }
  if (batch * steps == 1) return;
  for (int i = 0; i < reply->outputs_size(); ++i) {
    auto* shape = reply->mutable_outputs(i)->mutable_shape();
    if (shape->size() > 0) shape->Set(0, batch);
    if (shape->size() > 1) shape->Set(1, steps);
    std::string repeated;
    for (int64_t r = 0; r < batch * steps; ++r) repeated += canned.infer.raw_output_contents(i);
    *reply->mutable_raw_output_contents(i) = std::move(repeated);
  }
}

// ---- a bidi stream that answers every request, in order ----------------------------------------

// Reads run ahead of writes (a client may pipeline, as perf_analyzer's streams do); replies queue
// and leave one write at a time. Deletes itself when gRPC is done with the stream.
template <class Request, class Reply>
class EchoStream final : public grpc::ServerBidiReactor<Request, Reply> {
 public:
  using Answer = std::function<void(const Request&, Reply*)>;

  explicit EchoStream(Answer answer) : answer_(std::move(answer)) { this->StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::lock_guard<std::mutex> lock(mu_);
      reading_ = false;
      FinishIfIdle();
      return;
    }
    Reply reply;
    answer_(request_, &reply);  // reads are serialized: answer_ may keep per-stream state
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.push_back(std::move(reply));  // a deque keeps the front's address while it grows
      if (!writing_) {
        writing_ = true;
        this->StartWrite(&pending_.front());
      }
    }
    this->StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.pop_front();
    if (!ok) pending_.clear();  // the client is gone: nothing more can be delivered
    if (pending_.empty()) {
      writing_ = false;
      FinishIfIdle();
    } else {
      this->StartWrite(&pending_.front());
    }
  }

  void OnDone() override { delete this; }

 private:
  void FinishIfIdle() {  // under mu_
    if (!reading_ && !writing_ && !finished_) {
      finished_ = true;
      this->Finish(grpc::Status::OK);
    }
  }

  Answer answer_;
  Request request_;
  std::mutex mu_;
  std::deque<Reply> pending_;
  bool reading_ = true;
  bool writing_ = false;
  bool finished_ = false;
};

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context,
                               const grpc::Status& status = grpc::Status::OK) {
  auto* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

grpc::Status UnknownModel(const std::string& name) {
  return {grpc::StatusCode::NOT_FOUND, "unknown model '" + name + "'"};
}

// ---- rnnserve.v1 -------------------------------------------------------------------------------

class EchoRnnServe final : public rs::RnnServe::CallbackService {
 public:
  explicit EchoRnnServe(const Canned& canned) : canned_(canned) {}

  grpc::ServerUnaryReactor* OpenSession(grpc::CallbackServerContext* context,
                                        const rs::OpenSessionRequest* request,
                                        rs::SessionInfo* reply) override {
    if (request->model() != canned_.model()) return Done(context, UnknownModel(request->model()));
    reply->set_session_id(FakeSessionId());
    reply->set_model(request->model());
    reply->set_version(1);
    reply->set_expires_at(canned_.step.expires_at());
    return Done(context);
  }

  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* context,
                                         const rs::CloseSessionRequest*,
                                         rs::CloseSessionResponse*) override {
    return Done(context);
  }

  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* context,
                                 const rs::StepRequest* request, rs::StepResponse* reply) override {
    EchoStep(canned_, request->session_id(), *request, reply);
    return Done(context);
  }

  grpc::ServerBidiReactor<rs::StepRequest, rs::StepResponse>* Session(
      grpc::CallbackServerContext*) override {
    return new EchoStream<rs::StepRequest, rs::StepResponse>(
        [this, session_id = std::string()](const rs::StepRequest& request,
                                           rs::StepResponse* reply) mutable {
          if (session_id.empty()) session_id = request.session_id();  // the first one names it
          EchoStep(canned_, session_id, request, reply);
        });
  }

  grpc::ServerBidiReactor<rs::StepManyRequest, rs::StepManyResponse>* StepMany(
      grpc::CallbackServerContext*) override {
    return new EchoStream<rs::StepManyRequest, rs::StepManyResponse>(
        [this](const rs::StepManyRequest& message, rs::StepManyResponse* reply) {
          if (message.has_packed()) {
            EchoPacked(canned_, message.packed(), reply->mutable_packed());
            return;
          }
          for (const auto& step : message.steps()) {
            auto* result = reply->add_results();
            result->set_session_id(step.session_id());
            EchoStep(canned_, step.session_id(), step, result->mutable_reply());
          }
        });
  }

 private:
  // As long as a real id (22 url-safe characters), so messages keep their real size.
  std::string FakeSessionId() {
    char id[32];
    std::snprintf(id, sizeof id, "echo%018llu",
                  static_cast<unsigned long long>(next_session_.fetch_add(1)));
    return id;
  }

  const Canned& canned_;
  std::atomic<uint64_t> next_session_{0};
};

// ---- the Open Inference Protocol ---------------------------------------------------------------

class EchoInference final : public oip::GRPCInferenceService::CallbackService {
 public:
  explicit EchoInference(const Canned& canned) : canned_(canned) {}

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* context,
                                       const oip::ServerLiveRequest*,
                                       oip::ServerLiveResponse* reply) override {
    reply->set_live(true);
    return Done(context);
  }

  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* context,
                                        const oip::ServerReadyRequest*,
                                        oip::ServerReadyResponse* reply) override {
    reply->set_ready(true);
    return Done(context);
  }

  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* context,
                                       const oip::ModelReadyRequest* request,
                                       oip::ModelReadyResponse* reply) override {
    reply->set_ready(request->name() == canned_.model());
    return Done(context);
  }

  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* context,
                                           const oip::ServerMetadataRequest*,
                                           oip::ServerMetadataResponse* reply) override {
    reply->set_name("rnnserve-bench-echo");
    reply->set_version("1");
    reply->add_extensions("sequence");  // no statistics: perf_analyzer then does not ask for them
    return Done(context);
  }

  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* context,
                                          const oip::ModelMetadataRequest* request,
                                          oip::ModelMetadataResponse* reply) override {
    if (request->name() != canned_.model()) return Done(context, UnknownModel(request->name()));
    *reply = canned_.metadata;
    return Done(context);
  }

  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* context,
                                        const oip::ModelConfigRequest* request,
                                        oip::ModelConfigResponse* reply) override {
    if (request->name() != canned_.model()) return Done(context, UnknownModel(request->name()));
    *reply = canned_.config;
    return Done(context);
  }

  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* context,
                                       const oip::ModelInferRequest* request,
                                       oip::ModelInferResponse* reply) override {
    if (request->model_name() != canned_.model()) {
      return Done(context, UnknownModel(request->model_name()));
    }
    EchoInfer(canned_, *request, reply);
    return Done(context);
  }

  grpc::ServerBidiReactor<oip::ModelInferRequest, oip::ModelStreamInferResponse>* ModelStreamInfer(
      grpc::CallbackServerContext*) override {
    return new EchoStream<oip::ModelInferRequest, oip::ModelStreamInferResponse>(
        [this](const oip::ModelInferRequest& request, oip::ModelStreamInferResponse* reply) {
          EchoInfer(canned_, request, reply->mutable_infer_response());
        });
  }

 private:
  const Canned& canned_;
};

// ---- main --------------------------------------------------------------------------------------

struct Options {
  std::string address = "127.0.0.1:0";
  std::string canned;
  int max_message_bytes = 64 << 20;
};

Options ParseOptions(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--address") {
      options.address = value;
    } else if (flag == "--canned") {
      options.canned = value;
    } else if (flag == "--max-message-bytes") {
      options.max_message_bytes = std::stoi(value);
    } else {
      throw std::invalid_argument("unknown flag " + flag);
    }
  }
  if (options.canned.empty()) throw std::invalid_argument("--canned DIR is required");
  return options;
}

int Serve(const Options& options) {
  const Canned canned(options.canned);
  EchoRnnServe rnnserve(canned);
  EchoInference inference(canned);
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.address, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(&rnnserve);
  builder.RegisterService(&inference);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "echo: cannot listen on %s\n", options.address.c_str());
    return 1;
  }
  const std::string host = options.address.substr(0, options.address.rfind(':'));
  std::printf("echo: listening on %s:%d\n", host.c_str(), port);
  std::fflush(stdout);
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  int signal_number = 0;
  sigwait(&stop, &signal_number);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals before gRPC starts its threads, so only sigwait in Serve sees them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  try {
    return Serve(ParseOptions(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "echo: %s\n", e.what());
    return 2;
  }
}
