#include "replies.h"

#include <algorithm>
#include <numeric>

namespace rnnserve {

namespace pb = ::rnnserve::v1;

Result<StepInput> decode_input(const ModelSpec& m, const pb::Input& input) {
  switch (input.data_case()) {
    case pb::Input::kFeatures: {
      const auto& f = input.features();
      const size_t n = static_cast<size_t>(f.values_size());
      uint32_t steps = f.steps();
      if (!m.tokens && steps == 0) {
        const size_t per = static_cast<size_t>(m.features);
        if (per && n % per) {
          return Error::invalid(std::to_string(n) + " values are not a whole number of " +
                                    std::to_string(per) + "-feature steps",
                                "input.features");
        }
        steps = static_cast<uint32_t>(per ? n / per : 0);
      }
      return decode_features(m, std::vector<float>(f.values().begin(), f.values().end()), steps);
    }
    case pb::Input::kText:
      return decode_text(m, input.text());
    case pb::Input::kTokens:
      return decode_tokens(m, std::vector<int64_t>(input.tokens().ids().begin(), input.tokens().ids().end()));
    default:
      return Error::invalid("empty input: set features, text or tokens", "input");
  }
}

void fill_reply(const ModelSpec& m, const Reply& r, uint32_t top_k, pb::StepResponse* reply) {
  const int o = m.output_size, k = m.prob_size();
  std::vector<float> p(static_cast<size_t>(k));
  std::vector<int> order(static_cast<size_t>(k));
  std::string text;
  for (uint32_t t = 0; t < r.steps; ++t) {
    const float* y = r.y.data() + static_cast<size_t>(t) * static_cast<size_t>(o);
    pb::Output* out = reply->add_outputs();
    out->mutable_raw()->Add(y, y + o);
    if (m.output_kind == OutputKind::kRegression) {
      out->mutable_value()->Add(y, y + o);
      continue;
    }
    probabilities(m, y, p.data());
    const int best = argmax(p.data(), k);
    out->set_index(static_cast<uint32_t>(best));
    if (m.output_kind == OutputKind::kClassification) {
      out->set_label(m.labels[static_cast<size_t>(best)]);
      out->mutable_probabilities()->Add(p.begin(), p.end());
      continue;
    }
    out->set_char_(m.labels[static_cast<size_t>(best)]);
    text += m.labels[static_cast<size_t>(best)];
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&p](int a, int b) { return p[a] > p[b]; });
    const size_t shown = std::min<size_t>(top_k, order.size());
    for (size_t i = 0; i < shown; ++i) {
      auto* cand = out->add_top_k();
      cand->set_char_(m.labels[static_cast<size_t>(order[i])]);
      cand->set_index(static_cast<uint32_t>(order[i]));
      cand->set_p(p[static_cast<size_t>(order[i])]);
    }
  }
  if (m.output_kind == OutputKind::kNextToken) reply->set_text(text);
}

pb::Error error_message(const Error& err) {
  pb::Error out;
  out.set_code(code_name(grpc_code(err.kind)));
  out.set_reason(reason(err.kind));
  out.set_message(err.message);
  if (err.expected_index) out.set_expected_step_index(*err.expected_index);
  if (err.kind == ErrorKind::kInvalidInput || err.kind == ErrorKind::kPayloadTooLarge) out.set_field(err.field);
  return out;
}

}  // namespace rnnserve
