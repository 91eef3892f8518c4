#include "oip_stats.h"

#include <chrono>

namespace rnnserve::oip {

void Statistics::succeeded(const Clock& c) {
  if (!c.model) return;
  const int64_t done = now_ns();
  const auto unix_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch());
  std::lock_guard<std::mutex> lock(mu_);
  ModelStats& s = by_model_[c.model->key()];
  s.success.add(done - c.started);
  s.compute_input.add(c.decoded - c.started);
  s.queue.add(c.queued.value_or(0));
  s.compute_infer.add(c.queued ? c.batch : c.computed - c.decoded);  // none: the bridge's whole call
  s.compute_output.add(done - c.computed);
  s.inference_count += c.rows;
  s.last_inference_ms = static_cast<uint64_t>(unix_ms.count());
}

void Statistics::failed(const Clock& c) {
  if (!c.model) return;
  const int64_t done = now_ns();
  std::lock_guard<std::mutex> lock(mu_);
  by_model_[c.model->key()].fail.add(done - c.started);
}

ModelStats Statistics::snapshot(const ModelSpec& m) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = by_model_.find(m.key());
  return it == by_model_.end() ? ModelStats{} : it->second;
}

namespace {

void fill_duration(const Duration& d, inference::StatisticDuration* out) {
  out->set_count(d.count);
  out->set_ns(d.ns);
}

}  // namespace

// execution_count: the step scheduler's batches over every API's steps of the model (they share
// its batches; 0 for a model without steps).
void fill_statistics(const ModelSpec& m, const ModelStats& s, uint64_t batches, inference::ModelStatistics* out) {
  out->set_name(m.name);
  out->set_version(std::to_string(m.version));
  out->set_last_inference(s.last_inference_ms);
  out->set_inference_count(s.inference_count);
  auto* inference = out->mutable_inference_stats();
  fill_duration(s.success, inference->mutable_success());
  fill_duration(s.fail, inference->mutable_fail());
  fill_duration(s.queue, inference->mutable_queue());
  fill_duration(s.compute_input, inference->mutable_compute_input());
  fill_duration(s.compute_infer, inference->mutable_compute_infer());
  fill_duration(s.compute_output, inference->mutable_compute_output());
  if (m.streamable) out->set_execution_count(batches);
}

}  // namespace rnnserve::oip
