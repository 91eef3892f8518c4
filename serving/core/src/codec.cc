#include "codec.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "text.h"

namespace rnnserve {

std::optional<Error> check_steps(const ModelSpec& m, size_t steps, const char* field) {
  if (steps < 1) return Error::invalid("empty input: send at least one time step", field);
  if (steps > m.max_steps) {
    return Error::invalid(std::to_string(steps) + " time steps in one request; " + m.name +
                              " accepts at most " + std::to_string(m.max_steps),
                          field);
  }
  return std::nullopt;
}

bool all_finite(const float* values, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(values[i])) return false;
  }
  return true;
}

namespace {
std::string count(size_t n, const char* noun) { return std::to_string(n) + " " + noun + (n == 1 ? "" : "s"); }
}  // namespace

Error feature_count_error(const ModelSpec& m, size_t values, size_t steps) {
  const auto f = static_cast<size_t>(m.features);
  return Error::invalid(m.name + " expects " + count(f, "feature") + " per step: " + count(values, "value") +
                            " do not make " + count(steps, "step") + " of " + count(f, "feature"),
                        "inputs");
}

Result<StepInput> decode_features(const ModelSpec& m, std::vector<float> values, uint32_t steps) {
  if (m.tokens) return Error::invalid(m.name + " takes text/tokens, not feature vectors", "inputs");
  const size_t f = static_cast<size_t>(m.features);
  if (values.size() != steps * f) return feature_count_error(m, values.size(), steps);
  if (auto err = check_steps(m, steps)) return *err;
  if (!all_finite(values.data(), values.size())) {
    return Error::invalid("inputs contain NaN or Inf", "inputs");
  }
  StepInput in;
  in.features = std::make_shared<const std::vector<float>>(std::move(values));
  in.steps = steps;
  return in;
}

namespace {

std::optional<Error> needs_vocab(const ModelSpec& m) {
  if (!m.tokens || m.vocab.empty()) {
    return Error::invalid(m.name + " takes feature vectors, not text/tokens", "text");
  }
  return std::nullopt;
}

StepInput from_ids(std::vector<int64_t> ids) {
  StepInput in;
  in.steps = static_cast<uint32_t>(ids.size());
  in.ids = std::make_shared<const std::vector<int64_t>>(std::move(ids));
  return in;
}

}  // namespace

Result<StepInput> decode_text(const ModelSpec& m, std::string_view text) {
  if (auto err = needs_vocab(m)) return *err;
  std::vector<char32_t> points;
  if (!utf8_decode(text, &points)) return Error::invalid("text must be a string", "text");
  if (auto err = check_steps(m, points.size())) return *err;
  std::vector<int64_t> ids;
  ids.reserve(points.size());
  std::set<char32_t> unknown;  // sorted, as Python's sorted(set)
  for (char32_t c : points) {
    auto it = m.char_index.find(c);
    if (it == m.char_index.end()) {
      unknown.insert(c);
    } else {
      ids.push_back(it->second);
    }
  }
  if (!unknown.empty()) {
    std::string shown;
    int listed = 0;
    for (char32_t c : unknown) {
      if (listed++ == 10) break;
      shown += (shown.empty() ? "" : ", ") + py_repr(utf8_encode(c));
    }
    return Error::invalid("characters outside " + m.name + "'s vocabulary (" +
                              std::to_string(m.vocab.size()) + " chars): " + shown,
                          "text");
  }
  return from_ids(std::move(ids));
}

Result<StepInput> decode_tokens(const ModelSpec& m, std::vector<int64_t> ids) {
  if (auto err = needs_vocab(m)) return *err;
  if (auto err = check_steps(m, ids.size())) return *err;
  const auto size = static_cast<int64_t>(m.vocab.size());
  for (int64_t id : ids) {
    if (id < 0 || id >= size) {
      return Error::invalid("token " + std::to_string(id) + " is outside the vocabulary [0, " +
                                std::to_string(size) + ")",
                            "tokens");
    }
  }
  return from_ids(std::move(ids));
}

void probabilities(const ModelSpec& m, const float* y, float* out) {
  const int n = m.output_size;
  switch (m.activation) {
    case Activation::kSigmoid: {
      const double v = y[0];
      const double positive = v > -700 ? 1.0 / (1.0 + std::exp(-v)) : 0.0;
      out[0] = static_cast<float>(1.0 - positive);
      out[1] = static_cast<float>(positive);
      return;
    }
    case Activation::kSoftmax: {
      const double top = *std::max_element(y, y + n);
      double total = 0;
      for (int i = 0; i < n; ++i) total += std::exp(static_cast<double>(y[i]) - top);
      for (int i = 0; i < n; ++i) {
        out[i] = static_cast<float>(std::exp(static_cast<double>(y[i]) - top) / total);
      }
      return;
    }
    case Activation::kLogSoftmax:
      for (int i = 0; i < n; ++i) out[i] = static_cast<float>(std::exp(static_cast<double>(y[i])));
      return;
    case Activation::kNone:
      for (int i = 0; i < n; ++i) out[i] = y[i];
      return;
  }
}

int argmax(const float* values, int n) {
  return static_cast<int>(std::max_element(values, values + n) - values);
}

}  // namespace rnnserve
