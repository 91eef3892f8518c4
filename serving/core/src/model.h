// One loaded model version as the core sees it: the manifest's shapes and words (no graph; the
// graph runs in Python, once per batch, through the Runner).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace rnnserve {

enum class OutputKind { kClassification, kRegression, kNextToken };
enum class Activation { kNone, kSigmoid, kSoftmax, kLogSoftmax };

struct StateSpec {
  std::string name;
  int layers = 1;  // num_layers * directions
  int size = 1;    // hidden size
  float init = 0.0f;
  size_t floats() const { return static_cast<size_t>(layers) * static_cast<size_t>(size); }
};

struct ModelSpec {
  std::string name;
  uint32_t version = 1;
  bool tokens = false;             // input kind: token ids (char models) or feature vectors
  std::string input_name;          // "x" or "tokens"
  int features = 0;                // F, feature models
  std::vector<std::string> vocab;  // index -> character, token models
  uint32_t max_steps = 1;          // most time steps one step call may carry (server cap applied)
  OutputKind output_kind = OutputKind::kRegression;
  int output_size = 1;             // O
  Activation activation = Activation::kNone;
  std::vector<std::string> labels;  // classification labels or next-token vocabulary
  std::vector<StateSpec> states;
  bool streamable = true;

  // derived by finish()
  std::unordered_map<char32_t, int> char_index;
  size_t state_floats = 0;  // one session's state, all tensors, (L, H) each, concatenated

  void finish();
  std::string key() const { return name + ":" + std::to_string(version); }
  // K: probabilities per step (2 for a one-logit sigmoid head), 0 for regression.
  int prob_size() const;
  bool same_io(const ModelSpec& other) const;  // inputs and outputs alike (packed blocks mix them)
};

using ModelPtr = std::shared_ptr<const ModelSpec>;

}  // namespace rnnserve
