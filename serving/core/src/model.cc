#include "model.h"

#include "text.h"

namespace rnnserve {

void ModelSpec::finish() {
  char_index.clear();
  std::vector<char32_t> points;
  for (size_t i = 0; i < vocab.size(); ++i) {
    if (utf8_decode(vocab[i], &points) && points.size() == 1) char_index[points[0]] = static_cast<int>(i);
  }
  state_floats = 0;
  for (const auto& s : states) state_floats += s.floats();
}

int ModelSpec::prob_size() const {
  if (output_kind == OutputKind::kRegression) return 0;
  return activation == Activation::kSigmoid ? 2 : output_size;
}

bool ModelSpec::same_io(const ModelSpec& o) const {
  return tokens == o.tokens && input_name == o.input_name && features == o.features &&
         vocab == o.vocab && output_kind == o.output_kind && output_size == o.output_size &&
         activation == o.activation && labels == o.labels;
}

}  // namespace rnnserve
