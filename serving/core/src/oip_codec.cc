#include "oip_codec.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "text.h"

namespace rnnserve::oip {

namespace inf = ::inference;

namespace {

constexpr const char* kInputAlias = "INPUT";  // Triton examples' customary name
constexpr const char* kTextInput = "text";    // BYTES, one UTF-8 string: char models only
constexpr const char* kOutputY = "y";
constexpr const char* kOutputProbs = "probabilities";
constexpr const char* kOutputLabel = "label";
constexpr size_t kMaxSequenceIdLength = 200;  // characters; the session id adds "oip:<model>:"
constexpr size_t kMaxErrorMessage = 1024;     // characters of a status message (see clipped)
constexpr uint64_t kMaxRows = 4096;           // engine.MAX_PREDICT_ROWS
constexpr uint64_t kFloatTextBytes = 47;      // f"{v:f}" of a float32: "-", 39 digits, ".", 6

using Params = google::protobuf::Map<std::string, inf::InferParameter>;

// ---- small words ---------------------------------------------------------------------------------

size_t chars(std::string_view utf8) {  // Python's len() of the decoded string
  size_t n = 0;
  for (unsigned char c : utf8) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

std::string clipped(const std::string& message) {
  if (chars(message) <= kMaxErrorMessage) return message;
  return utf8_prefix(message, kMaxErrorMessage - 1) + "\xE2\x80\xA6";
}

namespace {

template <class Ints>
std::string shape_text(const Ints& shape) {  // Python's str() of a list of ints
  std::string out = "[";
  for (const auto& d : shape) out += (out.size() > 1 ? ", " : "") + std::to_string(d);
  return out + "]";
}

// The exact product of non-negative factors, as Python's math.prod: little-endian base-1e9 limbs.
class Product {
 public:
  void times(uint64_t factor) {
    unsigned __int128 carry = 0;
    for (auto& limb : limbs_) {
      const unsigned __int128 v = static_cast<unsigned __int128>(limb) * factor + carry;
      limb = static_cast<uint32_t>(v % kBase);
      carry = v / kBase;
    }
    for (; carry; carry /= kBase) limbs_.push_back(static_cast<uint32_t>(carry % kBase));
    while (limbs_.size() > 1 && limbs_.back() == 0) limbs_.pop_back();
  }
  bool equals(uint64_t n) const {
    Product other;
    other.limbs_ = {1};
    other.times(n);
    return other.limbs_ == limbs_;
  }
  std::string text() const {
    std::string out = std::to_string(limbs_.back());
    char limb[16];
    for (size_t i = limbs_.size() - 1; i-- > 0;) {
      std::snprintf(limb, sizeof limb, "%09u", limbs_[i]);
      out += limb;
    }
    return out;
  }

 private:
  static constexpr uint64_t kBase = 1000000000;
  std::vector<uint32_t> limbs_{1};
};

const char* kind_name(const inf::InferParameter& p) {  // Python's WhichOneof
  switch (p.parameter_choice_case()) {
    case inf::InferParameter::kBoolParam: return "bool_param";
    case inf::InferParameter::kInt64Param: return "int64_param";
    case inf::InferParameter::kStringParam: return "string_param";
    case inf::InferParameter::kDoubleParam: return "double_param";
    case inf::InferParameter::kUint64Param: return "uint64_param";
    default: return "None";
  }
}

// ---- sequence parameters and versions ------------------------------------------------------------

Result<bool> bool_param(const Params& params, const std::string& name) {
  auto it = params.find(name);
  if (it == params.end()) return false;
  if (it->second.parameter_choice_case() != inf::InferParameter::kBoolParam) {
    return Error::invalid("parameter " + name + " must be a bool", name);
  }
  return it->second.bool_param();
}

Result<std::optional<SequenceId>> sequence_id(const Params& params) {
  auto it = params.find("sequence_id");
  if (it == params.end()) return std::optional<SequenceId>();
  const auto& p = it->second;
  switch (p.parameter_choice_case()) {  // 0 and "" mean "no sequence", as in Triton
    case inf::InferParameter::kInt64Param:
      if (!p.int64_param()) return std::optional<SequenceId>();
      return std::optional<SequenceId>(SequenceId{std::to_string(p.int64_param()), false});
    case inf::InferParameter::kUint64Param:
      if (!p.uint64_param()) return std::optional<SequenceId>();
      return std::optional<SequenceId>(SequenceId{std::to_string(p.uint64_param()), false});
    case inf::InferParameter::kStringParam: {
      if (p.string_param().empty()) return std::optional<SequenceId>();
      const size_t n = chars(p.string_param());
      if (n > kMaxSequenceIdLength) {
        return Error::invalid("sequence_id is " + std::to_string(n) + " characters; at most " +
                                  std::to_string(kMaxSequenceIdLength),
                              "sequence_id");
      }
      return std::optional<SequenceId>(SequenceId{p.string_param(), true});
    }
    default:
      return Error::invalid(std::string("parameter sequence_id must be an integer or a string, got ") + kind_name(p),
                            "sequence_id");
  }
}

constexpr const char* kStepIndex = "sequence_step_index";

Result<std::optional<uint64_t>> step_index(const Params& params) {
  auto it = params.find(kStepIndex);
  if (it == params.end()) return std::optional<uint64_t>();
  const auto& p = it->second;
  if (p.parameter_choice_case() == inf::InferParameter::kUint64Param) return std::optional<uint64_t>(p.uint64_param());
  if (p.parameter_choice_case() == inf::InferParameter::kInt64Param && p.int64_param() >= 0) {
    return std::optional<uint64_t>(static_cast<uint64_t>(p.int64_param()));
  }
  const std::string got = p.parameter_choice_case() == inf::InferParameter::kInt64Param
                              ? std::to_string(p.int64_param())
                              : kind_name(p);
  return Error::invalid(std::string("parameter ") + kStepIndex + " must be a non-negative integer (int64_param or " +
                            "uint64_param), got " + got,
                        kStepIndex);
}

// The step index only numbers a sequence's steps, and a start is step 0 of a fresh sequence.
std::optional<Error> check_step_index(const SequenceControl& c) {
  if (!c.step_index) return std::nullopt;
  if (!c.id) {
    return Error::invalid(std::string(kStepIndex) + " numbers the steps of a sequence: send it with a sequence_id",
                          kStepIndex);
  }
  if (c.start && *c.step_index != 0) {
    return Error::invalid(std::string(kStepIndex) + " is " + std::to_string(*c.step_index) +
                              " on a request with sequence_start; a sequence starts at step 0",
                          kStepIndex);
  }
  return std::nullopt;
}

}  // namespace

std::string SequenceId::repr() const { return is_string ? py_repr(text) : text; }

Result<SequenceControl> sequence_control(const inf::ModelInferRequest& r) {
  auto id = sequence_id(r.parameters());
  if (!id.ok()) return id.error();
  auto start = bool_param(r.parameters(), "sequence_start");
  if (!start.ok()) return start.error();
  auto end = bool_param(r.parameters(), "sequence_end");
  if (!end.ok()) return end.error();
  auto index = step_index(r.parameters());
  if (!index.ok()) return index.error();
  SequenceControl control{id.value(), start.value(), end.value(), index.value()};
  if (auto err = check_step_index(control)) return *err;
  return control;
}

std::string session_id_for(const std::string& identity, const std::string& model, const SequenceId& id) {
  return identity.empty() ? "oip:" + model + ":" + id.text : "oip:" + identity + ":" + model + ":" + id.text;
}

std::string sequence_key(const std::string& identity, const inf::ModelInferRequest& r) {
  auto control = sequence_control(r);
  if (!control.ok() || !control.value().id) return "";
  return session_id_for(identity, r.model_name(), *control.value().id);
}

Result<std::optional<std::string>> parse_version(const std::string& text) {
  if (text.empty()) return std::optional<std::string>();
  const bool digits = std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  const size_t first = text.find_first_not_of('0');
  if (!digits || text.size() > 18 || first == std::string::npos) {
    const std::string shown = chars(text) <= 64 ? text : utf8_prefix(text, 64) + "\xE2\x80\xA6";
    return Error::invalid("model_version must be a positive integer, got " + py_repr(shown), "version");
  }
  return std::optional<std::string>(text.substr(first));
}

// ---- the request's input tensor → rows ----------------------------------------------------------

std::string expected_inputs(const ModelSpec& m) {
  if (!m.tokens) return py_repr(m.input_name) + " FP32 [1, T, " + std::to_string(m.features) + "]";
  return py_repr(m.input_name) + " INT64 [1, T] or " + py_repr(kTextInput) + " BYTES [1] (one UTF-8 string)";
}

namespace {

struct TheInput {
  const inf::ModelInferRequest::InferInputTensor* tensor = nullptr;
  const std::string* raw = nullptr;  // raw_input_contents[0], when the request uses them
};

Result<TheInput> the_input(const ModelSpec& m, const inf::ModelInferRequest& r) {
  if (r.inputs_size() != 1) {
    return Error::invalid(m.name + " takes exactly one input tensor, " + expected_inputs(m) + "; got " +
                              std::to_string(r.inputs_size()),
                          "inputs");
  }
  const auto& tensor = r.inputs(0);
  const std::string& name = tensor.name();
  if (name != m.input_name && name != kInputAlias && !(m.tokens && name == kTextInput)) {
    return Error::invalid(m.name + " has no input " + py_repr(name) + "; send " + expected_inputs(m), "inputs");
  }
  if (tensor.datatype() == "BYTES" && !m.tokens) {
    return Error::invalid(m.name + " takes numbers, not text: send " + expected_inputs(m), "inputs");
  }
  TheInput in{&tensor, nullptr};
  if (r.raw_input_contents_size()) {
    if (r.raw_input_contents_size() != r.inputs_size()) {
      return Error::invalid(std::to_string(r.raw_input_contents_size()) + " raw_input_contents for " +
                                std::to_string(r.inputs_size()) + " inputs: send one per input",
                            "raw_input_contents");
    }
    in.raw = &r.raw_input_contents(0);
  }
  return in;
}

std::optional<Error> check_batch(int64_t rows) {
  if (rows == 0) return Error::invalid("empty input: the batch dimension is 0", "inputs");
  if (static_cast<uint64_t>(rows) > kMaxRows) {  // each stateless row holds a session while it runs
    return Error::too_large("batch of " + std::to_string(rows) + " rows; at most " + std::to_string(kMaxRows),
                            "inputs");
  }
  return std::nullopt;
}

// Each dimension (rank checked, count matched) within what the model takes, before the values
// are shaped: one dimension of 0 makes the count 0 whatever the others say. Every product here
// is at most the values received, so it fits.
std::optional<Error> check_dims(const ModelSpec& m, const google::protobuf::RepeatedField<int64_t>& shape) {
  if (auto err = check_batch(shape[0])) return err;
  if (auto err = check_steps(m, static_cast<size_t>(shape[1]))) return err;
  if (shape.size() == 3 && shape[2] != m.features) {
    return feature_count_error(m, static_cast<size_t>(shape[1] * shape[2]), static_cast<size_t>(shape[1]));
  }
  return std::nullopt;
}

template <class T>
struct Numeric {
  std::vector<T> values;
  int64_t rows = 0;
  size_t per_row = 0;
};

// The values of a numeric tensor, checking rank, count and then each dimension; `Wire` is its
// element type on the wire (INT32 arrives as int32 and is widened).
template <class T, class Wire>
Result<Numeric<T>> numeric_values(const ModelSpec& m, const inf::ModelInferRequest::InferInputTensor& t,
                                  const std::string* raw, const google::protobuf::RepeatedField<Wire>& contents,
                                  const char* field, int rank, const std::string& what) {
  const auto& shape = t.shape();
  if (shape.size() != rank || *std::min_element(shape.begin(), shape.end()) < 0) {
    return Error::invalid("input " + py_repr(t.name()) + " has shape " + shape_text(shape) + "; send " + what, "inputs");
  }
  Product count;  // exact: a client's shape may name more elements than 128 bits count
  for (int64_t d : shape) count.times(static_cast<uint64_t>(d));
  const bool raw_fits = raw && raw->size() % sizeof(Wire) == 0 && count.equals(raw->size() / sizeof(Wire));
  if (raw && !raw_fits) {
    Product bytes = count;
    bytes.times(sizeof(Wire));
    return Error::invalid("raw_input_contents holds " + std::to_string(raw->size()) + " bytes; shape " +
                              shape_text(shape) + " of " + t.datatype() + " needs " + bytes.text(),
                          "raw_input_contents");
  }
  if (!raw && !count.equals(static_cast<uint64_t>(contents.size()))) {
    return Error::invalid("contents." + std::string(field) + " holds " + std::to_string(contents.size()) +
                              " values; shape " + shape_text(shape) + " needs " + count.text(),
                          "inputs");
  }
  if (auto err = check_dims(m, shape)) return *err;
  Numeric<T> out;
  out.rows = shape[0];
  if (raw) {
    std::vector<Wire> wire(raw->size() / sizeof(Wire));
    std::memcpy(wire.data(), raw->data(), raw->size());  // little-endian hosts
    out.values.assign(wire.begin(), wire.end());
  } else {
    out.values.assign(contents.begin(), contents.end());
  }
  out.per_row = out.values.size() / static_cast<size_t>(out.rows);
  return out;
}

Error bad_datatype(const inf::ModelInferRequest::InferInputTensor& t, const std::string& what) {
  const std::string type = t.datatype().empty() ? "(empty)" : t.datatype();
  return Error::invalid("input " + py_repr(t.name()) + " has datatype " + type + "; send " + what, "inputs");
}

Result<Rows> feature_rows(const ModelSpec& m, const TheInput& in) {
  const auto& t = *in.tensor;
  if (t.datatype() != "FP32") return bad_datatype(t, expected_inputs(m));
  auto arr = numeric_values<float>(m, t, in.raw, t.contents().fp32_contents(), "fp32_contents", 3, expected_inputs(m));
  if (!arr.ok()) return arr.error();
  if (auto err = check_batch(arr.value().rows)) return *err;
  Rows rows;
  const auto steps = static_cast<uint32_t>(t.shape(1));
  const auto& v = arr.value().values;
  for (size_t b = 0, n = arr.value().per_row; b < static_cast<size_t>(arr.value().rows); ++b) {
    auto row = decode_features(m, std::vector<float>(v.begin() + b * n, v.begin() + (b + 1) * n), steps);
    if (!row.ok()) return row.error();
    rows.push_back(std::move(row.value()));
  }
  return rows;
}

Result<Rows> token_rows(const ModelSpec& m, const TheInput& in) {
  const auto& t = *in.tensor;
  Result<Numeric<int64_t>> arr = Error::invalid("", "");
  if (t.datatype() == "INT64") {
    arr = numeric_values<int64_t>(m, t, in.raw, t.contents().int64_contents(), "int64_contents", 2, expected_inputs(m));
  } else if (t.datatype() == "INT32") {
    arr = numeric_values<int64_t>(m, t, in.raw, t.contents().int_contents(), "int_contents", 2, expected_inputs(m));
  } else {
    return bad_datatype(t, expected_inputs(m));
  }
  if (!arr.ok()) return arr.error();
  if (auto err = check_batch(arr.value().rows)) return *err;
  Rows rows;
  const auto& v = arr.value().values;
  for (size_t b = 0, n = arr.value().per_row; b < static_cast<size_t>(arr.value().rows); ++b) {
    auto row = decode_tokens(m, std::vector<int64_t>(v.begin() + b * n, v.begin() + (b + 1) * n));
    if (!row.ok()) return row.error();
    rows.push_back(std::move(row.value()));
  }
  return rows;
}

// Triton's BYTES wire form: each element is a little-endian uint32 length, then the bytes. Stops
// after `at_most` elements (the caller only needs to know there are too many).
Result<std::vector<std::string_view>> bytes_elements(const std::string& raw, size_t at_most) {
  std::vector<std::string_view> items;
  size_t at = 0;
  while (at < raw.size() && items.size() < at_most) {
    if (at + 4 > raw.size()) return Error::invalid("BYTES raw_input_contents ends inside a length prefix");
    uint32_t n = 0;
    std::memcpy(&n, raw.data() + at, 4);
    if (at + 4 + n > raw.size()) return Error::invalid("BYTES raw_input_contents is shorter than its length prefix");
    items.emplace_back(raw.data() + at + 4, n);
    at += 4 + n;
  }
  return items;
}

// Python's UnicodeDecodeError wording for the first byte that is not UTF-8.
std::string utf8_problem(std::string_view bytes) {
  std::vector<char32_t> points;
  for (size_t i = 0; i < bytes.size(); ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    char byte[8];
    std::snprintf(byte, sizeof byte, "0x%02x", c);
    const std::string where = std::string("'utf-8' codec can't decode byte ") + byte + " in position " + std::to_string(i);
    if (len == 0) return where + ": invalid start byte";
    if (i + len > bytes.size()) return where + ": unexpected end of data";
    if (!utf8_decode(bytes.substr(i, len), &points)) return where + ": invalid continuation byte";
    i += len - 1;
  }
  return "invalid UTF-8";
}

Result<Rows> text_rows(const ModelSpec& m, const TheInput& in) {
  const auto& t = *in.tensor;
  const std::string one = "input " + py_repr(t.name()) + " must hold one string (shape [1]); got ";
  const auto& shape = t.shape();
  const bool one_shape = (shape.size() == 1 && shape[0] == 1) || (shape.size() == 2 && shape[0] == 1 && shape[1] == 1);
  if (!one_shape) return Error::invalid(one + "shape " + shape_text(shape), "inputs");
  std::vector<std::string_view> items;
  if (in.raw) {
    auto parsed = bytes_elements(*in.raw, 2);  // a raw body of a million empty strings: 2 parsed
    if (!parsed.ok()) return parsed.error();
    items = parsed.value();
  } else {
    for (int i = 0; i < std::min(2, t.contents().bytes_contents_size()); ++i) items.push_back(t.contents().bytes_contents(i));
  }
  if (items.size() != 1) return Error::invalid(one + (items.empty() ? "no elements" : "more than one element"), "inputs");
  std::vector<char32_t> points;
  if (!utf8_decode(items[0], &points)) {
    return Error::invalid("input " + py_repr(t.name()) + " is not UTF-8: " + utf8_problem(items[0]), "inputs");
  }
  auto row = decode_text(m, items[0]);
  if (!row.ok()) return row.error();
  return Rows{std::move(row.value())};
}

}  // namespace

Result<Rows> decode_rows(const ModelSpec& m, const inf::ModelInferRequest& r) {
  auto in = the_input(m, r);
  if (!in.ok()) return in.error();
  if (in.value().tensor->datatype() == "BYTES") return text_rows(m, in.value());
  return m.tokens ? token_rows(m, in.value()) : feature_rows(m, in.value());
}

namespace {

// ---- outputs ------------------------------------------------------------------------------------

std::vector<std::string> output_names(const ModelSpec& m) {
  if (m.output_kind == OutputKind::kRegression) return {kOutputY};
  return {kOutputY, kOutputProbs, kOutputLabel};
}

std::string joined(const std::vector<std::string>& words) {
  std::string out;
  for (const auto& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

Result<int64_t> class_count(const inf::ModelInferRequest::InferRequestedOutputTensor& out) {
  auto it = out.parameters().find("classification");
  if (it == out.parameters().end()) return int64_t{0};
  const auto& p = it->second;
  const int64_t k = p.parameter_choice_case() == inf::InferParameter::kInt64Param ? p.int64_param() : -1;
  if (k < 1 || out.name() == kOutputLabel) {
    return Error::invalid("classification on output " + py_repr(out.name()) +
                              " needs a positive int64 count and a numeric output ('y' or 'probabilities')",
                          "outputs");
  }
  return k;
}

}  // namespace

Result<std::vector<Wanted>> requested_outputs(const inf::ModelInferRequest& r, const ModelSpec& m) {
  const auto names = output_names(m);
  std::vector<Wanted> wanted;
  if (!r.outputs_size()) {
    for (const auto& n : names) wanted.push_back(Wanted{n, 0});
    return wanted;
  }
  for (const auto& out : r.outputs()) {
    if (std::find(names.begin(), names.end(), out.name()) == names.end()) {
      return Error::invalid(m.name + " has no output " + py_repr(out.name()) + "; it has: " + joined(names), "outputs");
    }
    auto k = class_count(out);
    if (!k.ok()) return k.error();
    auto same = std::find_if(wanted.begin(), wanted.end(), [&out](const Wanted& w) { return w.name == out.name(); });
    if (same == wanted.end()) {
      wanted.push_back(Wanted{out.name(), k.value()});
    } else {
      same->classes = k.value();
    }
  }
  return wanted;
}

namespace {

size_t probabilities_size(const ModelSpec& m) {
  return m.activation == Activation::kSigmoid ? 2 : static_cast<size_t>(m.output_size);
}

// Bytes one position (a row's time step) adds to an output: an upper bound.
uint64_t bytes_per_position(const ModelSpec& m, const Wanted& w) {
  uint64_t longest = 0;
  for (const auto& label : m.labels) longest = std::max<uint64_t>(longest, label.size());
  if (w.name == kOutputLabel) return 4 + longest;  // BYTES: length prefix + text
  const uint64_t size = w.name == kOutputY ? static_cast<uint64_t>(m.output_size) : probabilities_size(m);
  if (!w.classes) return 4 * size;  // FP32
  const uint64_t entry = kFloatTextBytes + std::to_string(size).size() + longest + 2;  // "value:index:label"
  return std::min<uint64_t>(static_cast<uint64_t>(w.classes), size) * (4 + entry);
}

}  // namespace

// An upper bound of the reply's size, from the rows, their steps and the outputs wanted.
std::optional<Error> check_reply_size(const inf::ModelInferRequest& r, const ModelSpec& m, const Rows& rows,
                                      const std::vector<Wanted>& wanted, uint64_t limit) {
  uint64_t positions = 0, per_position = 0;
  for (const auto& row : rows) positions += row.steps;
  for (const auto& w : wanted) per_position += bytes_per_position(m, w);
  const uint64_t estimate = positions * per_position + chars(r.id()) + chars(r.model_name()) + 1024;
  if (estimate <= limit) return std::nullopt;
  std::vector<std::string> names;
  for (const auto& w : wanted) names.push_back(w.name);
  return Error::too_large("the reply would take up to " + std::to_string(estimate) + " bytes (" +
                              std::to_string(rows.size()) + " rows \xC3\x97 " + std::to_string(rows[0].steps) +
                              " time steps of outputs " + joined(names) + "); the limit is " +
                              std::to_string(limit) + " bytes: send fewer rows or time steps, or request fewer outputs",
                          "outputs");
}

namespace {

// One output tensor: (positions, width) floats, or strings.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> floats;
  std::vector<std::string> strings;
};

std::string float_text(float v) {  // Python's f"{v:f}"
  if (std::isnan(v)) return "nan";
  char out[64];
  std::snprintf(out, sizeof out, "%f", static_cast<double>(v));
  return out;
}

// Top k along the last axis as Triton's "value:index:label" strings (no label when the axis is
// not the labels'), ranked as NumPy's stable argsort of -values (NaN last).
Tensor classification(const ModelSpec& m, const Tensor& values, int64_t k) {
  const size_t width = static_cast<size_t>(values.shape.back());
  const size_t keep = std::min(static_cast<size_t>(k), width);
  const bool labelled = m.labels.size() == width;
  Tensor out;
  out.shape = values.shape;
  out.shape.back() = static_cast<int64_t>(keep);
  std::vector<size_t> order(width);
  for (size_t at = 0; at < values.floats.size(); at += width) {
    const float* v = &values.floats[at];
    for (size_t i = 0; i < width; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [v](size_t a, size_t b) {
      if (std::isnan(v[b])) return !std::isnan(v[a]);
      return !std::isnan(v[a]) && v[a] > v[b];
    });
    for (size_t i = 0; i < keep; ++i) {
      std::string entry = float_text(v[order[i]]) + ":" + std::to_string(order[i]);
      out.strings.push_back(labelled ? entry + ":" + m.labels[order[i]] : entry);
    }
  }
  return out;
}

void add_output(const std::string& name, const Tensor& t, inf::ModelInferResponse* reply) {
  auto* out = reply->add_outputs();
  out->set_name(name);
  out->mutable_shape()->Add(t.shape.begin(), t.shape.end());
  std::string* data = reply->add_raw_output_contents();
  if (t.strings.empty() && !t.floats.empty()) {
    out->set_datatype("FP32");
    data->assign(reinterpret_cast<const char*>(t.floats.data()), t.floats.size() * sizeof(float));
    return;
  }
  out->set_datatype("BYTES");
  for (const auto& s : t.strings) {
    const auto n = static_cast<uint32_t>(s.size());
    data->append(reinterpret_cast<const char*>(&n), 4);
    data->append(s);
  }
}

}  // namespace

void fill_outputs(const ModelSpec& m, std::vector<float> y, int64_t rows, int64_t steps,
                  const std::vector<Wanted>& wanted, inf::ModelInferResponse* reply) {
  const size_t positions = static_cast<size_t>(rows * steps), o = static_cast<size_t>(m.output_size);
  const size_t k = probabilities_size(m);
  Tensor probs{{rows, steps, static_cast<int64_t>(k)}, {}, {}};
  if (std::any_of(wanted.begin(), wanted.end(), [](const Wanted& w) { return w.name != kOutputY; })) {
    probs.floats.resize(positions * k);  // once for both probabilities and label
    for (size_t i = 0; i < positions; ++i) probabilities(m, &y[i * o], &probs.floats[i * k]);
  }
  Tensor ys{{rows, steps, static_cast<int64_t>(o)}, std::move(y), {}};
  for (const auto& w : wanted) {
    Tensor label{{rows, steps}, {}, {}};
    if (w.name == kOutputLabel) {
      for (size_t i = 0; i < positions; ++i) {
        label.strings.push_back(m.labels[static_cast<size_t>(argmax(&probs.floats[i * k], static_cast<int>(k)))]);
      }
    }
    const Tensor& values = w.name == kOutputY ? ys : w.name == kOutputProbs ? probs : label;
    if (w.classes) {
      add_output(w.name, classification(m, values, w.classes), reply);
    } else {
      add_output(w.name, values, reply);
    }
  }
}

}  // namespace rnnserve::oip
