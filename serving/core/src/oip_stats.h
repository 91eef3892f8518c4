// Triton's statistics of the OIP requests the core answers, per model version.
//
// Each request is timed in phases, as serving/oip_stats.py does: decoding the inputs
// (compute_input), waiting for its step batch (queue) and that batch's model call (compute_infer;
// a request of several rows takes its slowest row's), building the reply (compute_output). It is
// counted once, as a success or a failure, under the model version it resolved to; a request
// naming an unknown model counts nowhere (as in Triton).
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "inference/grpc_service.pb.h"
#include "model.h"
#include "session.h"

namespace rnnserve::oip {

struct Duration {
  uint64_t count = 0, ns = 0;
  void add(int64_t elapsed_ns) {
    ++count;
    ns += static_cast<uint64_t>(std::max<int64_t>(0, elapsed_ns));
  }
};

struct ModelStats {
  Duration success, fail, queue, compute_input, compute_infer, compute_output;
  uint64_t inference_count = 0;  // rows: a request of batch 4 counts 4
  uint64_t last_inference_ms = 0;
};

struct Clock {  // one request's phase boundaries (steady ns) and the model it resolved to
  int64_t started = now_ns(), decoded = 0, computed = 0;
  std::optional<int64_t> queued;  // none: no step scheduler timed it (the bridge's sequence graph)
  int64_t batch = 0;
  ModelPtr model;
  uint64_t rows = 0;
  void timed(const Reply& r) {
    queued = std::max(queued.value_or(0), r.queue_ns);
    batch = std::max(batch, r.batch_ns);
  }
};

class Statistics {
 public:
  void succeeded(const Clock& c);
  void failed(const Clock& c);
  ModelStats snapshot(const ModelSpec& m) const;  // zeros for a model never asked

 private:
  mutable std::mutex mu_;
  std::unordered_map<std::string, ModelStats> by_model_;  // "name:version"
};

// One model version's ModelStatistics (`batches`: its step scheduler's, 0 without steps).
void fill_statistics(const ModelSpec& m, const ModelStats& s, uint64_t batches, inference::ModelStatistics* out);

}  // namespace rnnserve::oip
