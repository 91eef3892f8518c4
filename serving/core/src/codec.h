// Inputs into validated arrays and head outputs into the model's own terms, with the same checks
// and messages as serving/codec.py (every transport calls these, so a mistake reads alike).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "model.h"
#include "result.h"

namespace rnnserve {

// One session's time steps for one step call: rows of a shared buffer, (T, F) floats or (T,) ids.
struct StepInput {
  std::shared_ptr<const std::vector<float>> features;
  std::shared_ptr<const std::vector<int64_t>> ids;
  size_t offset = 0;  // first element of this session's rows in the buffer
  uint32_t steps = 0;
  const float* feature_rows() const { return features->data() + offset; }
  const int64_t* id_rows() const { return ids->data() + offset; }
};

// codec.check_steps: 1..limit time steps.
std::optional<Error> check_steps(const ModelSpec& m, size_t steps, const char* field = "inputs");
// codec.feature_count_error: the one message for features that do not fit the model.
Error feature_count_error(const ModelSpec& m, size_t values, size_t steps);
// codec.decode_features on a flat buffer of `steps` x F values (steps = 0: the values decide).
Result<StepInput> decode_features(const ModelSpec& m, std::vector<float> values, uint32_t steps);
// codec.decode_text: characters to ids, refusing characters outside the vocabulary.
Result<StepInput> decode_text(const ModelSpec& m, std::string_view text);
// codec.decode_tokens: ids inside the vocabulary.
Result<StepInput> decode_tokens(const ModelSpec& m, std::vector<int64_t> ids);
bool all_finite(const float* values, size_t n);

// codec.probabilities of one step's head output (O,) → (K,), computed in double as Python's
// probabilities_row does.
void probabilities(const ModelSpec& m, const float* y, float* out);
// The first index of the largest value (NumPy's argmax).
int argmax(const float* values, int n);

}  // namespace rnnserve
