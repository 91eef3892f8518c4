// What the core counts: RPCs by method and code, steps and their latency by model, batch sizes,
// evictions. Lock-free counters on the hot path; Python reads a snapshot at scrape time and shows
// it in Prometheus (serving/metrics.py names them).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace rnnserve {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double value);
  std::vector<uint64_t> counts() const;  // per bucket (cumulative is Prometheus's job), + the +Inf one
  double sum() const;
  const std::vector<double>& bounds() const { return bounds_; }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;
  std::atomic<uint64_t> sum_micros_{0};
};

struct ModelMetrics {
  ModelMetrics();
  Histogram step_latency;  // seconds from a step's arrival in the core to its answer
  Histogram batch_size;    // sessions per model call
  std::atomic<uint64_t> steps_ok{0}, steps_failed{0};
  std::atomic<uint64_t> compute_ns{0}, queue_ns{0}, batches{0};
  std::atomic<uint64_t> evicted{0}, closed{0};
};

class Metrics {
 public:
  ModelMetrics& model(const std::string& name);  // created on first use; stable address
  void request(const std::string& method, const char* code);
  std::map<std::pair<std::string, std::string>, uint64_t> requests() const;
  void refused(const std::string& method, const char* reason);  // refused before its handler ran
  std::map<std::pair<std::string, std::string>, uint64_t> refusals() const;
  std::map<std::string, ModelMetrics*> models();

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<ModelMetrics>> models_;
  std::map<std::pair<std::string, std::string>, uint64_t> requests_;
  std::map<std::pair<std::string, std::string>, uint64_t> refused_;
};

}  // namespace rnnserve
