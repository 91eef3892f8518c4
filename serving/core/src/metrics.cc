#include "metrics.h"

#include <algorithm>

namespace rnnserve {

namespace {
std::vector<double> latency_bounds() {
  return {1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.5};
}
std::vector<double> batch_bounds() { return {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}; }
}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1)) {}

void Histogram::observe(double value) {
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_micros_.fetch_add(static_cast<uint64_t>(value * 1e6), std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::counts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  for (size_t i = 0; i < out.size(); ++i) out[i] = counts_[i].load(std::memory_order_relaxed);
  return out;
}

double Histogram::sum() const { return static_cast<double>(sum_micros_.load()) / 1e6; }

ModelMetrics::ModelMetrics() : step_latency(latency_bounds()), batch_size(batch_bounds()) {}

ModelMetrics& Metrics::model(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = models_[name];
  if (!slot) slot = std::make_unique<ModelMetrics>();
  return *slot;
}

void Metrics::request(const std::string& method, const char* code) {
  std::lock_guard<std::mutex> lock(mu_);
  requests_[{method, code}] += 1;
}

std::map<std::pair<std::string, std::string>, uint64_t> Metrics::requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_;
}

void Metrics::refused(const std::string& method, const char* reason) {
  std::lock_guard<std::mutex> lock(mu_);
  refused_[{method, reason}] += 1;
}

std::map<std::pair<std::string, std::string>, uint64_t> Metrics::refusals() const {
  std::lock_guard<std::mutex> lock(mu_);
  return refused_;
}

std::map<std::string, ModelMetrics*> Metrics::models() {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, ModelMetrics*> out;
  for (auto& [name, m] : models_) out[name] = m.get();
  return out;
}

}  // namespace rnnserve
