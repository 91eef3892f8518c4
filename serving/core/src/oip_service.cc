#include "oip_service.h"

#include <google/protobuf/descriptor.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <set>
#include <tuple>
#include <unordered_map>

#include "core.h"
#include "inference/grpc_service.grpc.pb.h"
#include "text.h"

namespace rnnserve {

namespace inf = ::inference;

namespace {

constexpr const char* kInputAlias = "INPUT";  // Triton examples' customary name
constexpr const char* kTextInput = "text";    // BYTES, one UTF-8 string: char models only
constexpr const char* kOutputY = "y";
constexpr const char* kOutputProbs = "probabilities";
constexpr const char* kOutputLabel = "label";
constexpr size_t kMaxSequenceIdLength = 200;      // characters; the session id adds "oip:<model>:"
constexpr size_t kMaxInFlightPerStream = 1024;    // unanswered requests before a stream stops reading
constexpr size_t kMaxErrorMessage = 1024;         // characters of a status message (see clipped)
constexpr uint64_t kMaxRows = 4096;               // engine.MAX_PREDICT_ROWS
constexpr uint64_t kMaxPaddedSteps = 16384;       // predict_batcher.MAX_PADDED_STEPS
constexpr uint64_t kFloatTextBytes = 47;          // f"{v:f}" of a float32: "-", 39 digits, ".", 6
constexpr const char* kInferMethod = "/inference.GRPCInferenceService/ModelInfer";
constexpr const char* kStatisticsMethod = "/inference.GRPCInferenceService/ModelStatistics";
const char* const kNative[] = {"ModelInfer", "ModelStreamInfer", "ModelStatistics"};

using Params = google::protobuf::Map<std::string, inf::InferParameter>;

// ---- small words ---------------------------------------------------------------------------------

size_t chars(std::string_view utf8) {  // Python's len() of the decoded string
  size_t n = 0;
  for (unsigned char c : utf8) n += (c & 0xC0) != 0x80;
  return n;
}

// Messages echo client values (a model name, a sequence id); past gRPC's metadata limit the
// client would get "Stream removed" instead of the status.
std::string clipped(const std::string& message) {
  if (chars(message) <= kMaxErrorMessage) return message;
  return utf8_prefix(message, kMaxErrorMessage - 1) + "\xE2\x80\xA6";
}

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

struct SequenceId {
  std::string text;  // decimal for integer ids
  bool is_string = false;
  std::string repr() const { return is_string ? py_repr(text) : text; }
};

struct SequenceControl {
  std::optional<SequenceId> id;  // none: stateless
  bool start = false, end = false;
};

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

Result<SequenceControl> sequence_control(const inf::ModelInferRequest& r) {
  auto id = sequence_id(r.parameters());
  if (!id.ok()) return id.error();
  auto start = bool_param(r.parameters(), "sequence_start");
  if (!start.ok()) return start.error();
  auto end = bool_param(r.parameters(), "sequence_end");
  if (!end.ok()) return end.error();
  return SequenceControl{id.value(), start.value(), end.value()};
}

std::string session_id_for(const std::string& model, const SequenceId& id) { return "oip:" + model + ":" + id.text; }

// The session id a stream chains a request under: 7 and "7" name one sequence, so they share a
// chain too. Empty: no sequence, or parameters that infer() answers with an error.
std::string sequence_key(const inf::ModelInferRequest& r) {
  auto control = sequence_control(r);
  if (!control.ok() || !control.value().id) return "";
  return session_id_for(r.model_name(), *control.value().id);
}

// '' = latest (none); otherwise a positive integer of at most 18 ASCII digits, as decimal text
// without leading zeros (a version past 32 bits is simply not loaded).
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

Result<ModelPtr> find_model(Core* core, const std::string& name, const std::optional<std::string>& version) {
  if (!version) return core->model(name, 0);
  if (version->size() <= 10 && std::stoull(*version) <= UINT32_MAX) {
    return core->model(name, static_cast<uint32_t>(std::stoull(*version)));
  }
  auto known = core->model(name, 0);  // the unknown-model error comes first
  if (!known.ok()) return known.error();
  std::string have;
  for (const auto& m : core->models()) {
    if (m->name == name) have += (have.empty() ? "" : ", ") + std::to_string(m->version);
  }
  return Error::of(ErrorKind::kVersionNotFound,
                   "model " + py_repr(name) + " has no version " + *version + "; loaded: " + have);
}

// ---- the request's input tensor → rows ----------------------------------------------------------

std::string expected_inputs(const ModelSpec& m) {
  if (!m.tokens) return py_repr(m.input_name) + " FP32 [1, T, " + std::to_string(m.features) + "]";
  return py_repr(m.input_name) + " INT64 [1, T] or " + py_repr(kTextInput) + " BYTES [1] (one UTF-8 string)";
}

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

using Rows = std::vector<StepInput>;

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

// The request's one input tensor → one validated row per batch row: (T, F) or (T,).
Result<Rows> decode_rows(const ModelSpec& m, const inf::ModelInferRequest& r) {
  auto in = the_input(m, r);
  if (!in.ok()) return in.error();
  if (in.value().tensor->datatype() == "BYTES") return text_rows(m, in.value());
  return m.tokens ? token_rows(m, in.value()) : feature_rows(m, in.value());
}

// ---- outputs ------------------------------------------------------------------------------------

struct Wanted {
  std::string name;
  int64_t classes = 0;  // Triton's classification count; 0 = the tensor itself
};

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

// Every output when the request names none; a name asked twice keeps its first place.
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

// Refuse, before any work, a reply that could not be sent: gRPC checks the size only after the
// whole reply is computed and serialized.
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

// y (B, T, O) → the reply, raw form, outputs in the order wanted.
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

// ---- Triton's statistics: per model version, what the OIP requests cost ------------------------
//
// Each request is timed in phases, as serving/oip_stats.py does: decoding the inputs
// (compute_input), waiting for its step batch (queue) and that batch's model call (compute_infer;
// a request of several rows takes its slowest row's), building the reply (compute_output). It is
// counted once, as a success or a failure, under the model version it resolved to; a request
// naming an unknown model counts nowhere (as in Triton).

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
  void succeeded(const Clock& c) {
    if (!c.model) return;
    const int64_t done = now_ns();
    std::lock_guard<std::mutex> lock(mu_);
    ModelStats& s = by_model_[c.model->key()];
    s.success.add(done - c.started);
    s.compute_input.add(c.decoded - c.started);
    s.queue.add(c.queued.value_or(0));
    s.compute_infer.add(c.queued ? c.batch : c.computed - c.decoded);
    s.compute_output.add(done - c.computed);
    s.inference_count += c.rows;
    s.last_inference_ms = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
            .count());
  }
  void failed(const Clock& c) {
    if (!c.model) return;
    const int64_t done = now_ns();
    std::lock_guard<std::mutex> lock(mu_);
    by_model_[c.model->key()].fail.add(done - c.started);
  }
  ModelStats snapshot(const ModelSpec& m) const {  // zeros for a model never asked
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_model_.find(m.key());
    return it == by_model_.end() ? ModelStats{} : it->second;
  }

 private:
  mutable std::mutex mu_;
  std::unordered_map<std::string, ModelStats> by_model_;  // "name:version"
};

void fill_duration(const Duration& d, inf::StatisticDuration* out) {
  out->set_count(d.count);
  out->set_ns(d.ns);
}

// One model version's ModelStatistics; execution_count is the step scheduler's batches over every
// API's steps of the model (they share its batches; 0 for a model without steps).
void fill_statistics(Core* core, const ModelSpec& m, const ModelStats& s, inf::ModelStatistics* out) {
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
  if (m.streamable) out->set_execution_count(core->metrics().model(m.name).batches.load());
}

// Empty name: every model; empty version: every version of the named model(s).
Result<std::vector<ModelPtr>> models_named(Core* core, const std::string& name, const std::string& version) {
  if (!name.empty() && !version.empty()) {
    auto v = parse_version(version);
    if (!v.ok()) return v.error();
    auto m = find_model(core, name, v.value());
    if (!m.ok()) return m.error();
    return std::vector<ModelPtr>{m.value()};
  }
  if (!name.empty()) {
    auto known = core->model(name, 0);  // NOT_FOUND for an unknown name
    if (!known.ok()) return known.error();
  }
  if (!version.empty()) return Error::invalid("model statistics of a version need the model's name", "version");
  std::vector<ModelPtr> found;
  for (const auto& m : core->models()) {
    if (name.empty() || m->name == name) found.push_back(m);
  }
  std::sort(found.begin(), found.end(),
            [](const ModelPtr& a, const ModelPtr& b) { return std::tie(a->name, a->version) < std::tie(b->name, b->version); });
  return found;
}

// ---- one request, start to answer --------------------------------------------------------------

struct Call {  // a request and its bytes as they came (the bridge takes them unchanged)
  inf::ModelInferRequest request;
  std::string bytes;
};
using CallPtr = std::shared_ptr<const Call>;

struct Answer {
  grpc::Status status;                // the request's error, message unclipped
  inf::ModelInferResponse response;  // when OK
};
using Answered = std::function<void(Answer)>;

Error not_open(const SequenceId& id, const std::string& model, const Error& err) {
  if (err.kind == ErrorKind::kSessionExpired) {
    return Error::of(err.kind, "sequence " + id.repr() + " of model " + py_repr(model) +
                                   " idled past the session TTL and expired; start it again with sequence_start=true");
  }
  if (err.kind == ErrorKind::kSessionNotFound) {
    return Error::of(err.kind, "sequence " + id.repr() + " of model " + py_repr(model) +
                                   " is not open (never started, or already ended): its first request must carry "
                                   "sequence_start=true");
  }
  return err;
}

// One ModelInferRequest → an Answer: decoded and checked here, stepped through the Stepper (a
// sequence's session, or a throwaway session per stateless row), or handed to the bridge.
class Inference : public std::enable_shared_from_this<Inference> {
 public:
  static void run(Core* core, Statistics* stats, CallPtr call, Answered done) {
    std::shared_ptr<Inference>(new Inference(core, stats, std::move(call), std::move(done)))->start();
  }

 private:
  Inference(Core* core, Statistics* stats, CallPtr call, Answered done)
      : core_(core), stats_(stats), call_(std::move(call)), done_(std::move(done)) {}

  const inf::ModelInferRequest& request() const { return call_->request; }

  void start() {
    if (auto err = prepare()) return fail(*err);
    if (!model_) return relay();
    if (control_.id) return step_sequence();
    rows_done_ = 0;
    y_.assign(rows_.size() * rows_[0].steps * static_cast<size_t>(model_->output_size), 0.0f);
    step_wave();
  }

  // Everything up to the point where the request can run; model_ stays empty for a request the
  // bridge answers (stateless, on a model that reads whole sequences).
  std::optional<Error> prepare() {
    auto control = sequence_control(request());
    if (!control.ok()) return control.error();
    control_ = control.value();
    auto version = parse_version(request().model_version());
    if (!version.ok()) return version.error();
    auto model = find_model(core_, request().model_name(), version.value());
    if (!model.ok()) return model.error();
    if (!control_.id && !model.value()->streamable) {
      clock_.model = model.value();
      return std::nullopt;
    }
    if (control_.id) {
      if (auto err = sequence_model(model.value(), version.value())) return err;
    } else {
      model_ = model.value();
    }
    clock_.model = model_;
    auto wanted = requested_outputs(request(), *model_);
    if (!wanted.ok()) return wanted.error();
    wanted_ = std::move(wanted.value());
    auto rows = decode_rows(*model_, request());
    if (!rows.ok()) return rows.error();
    rows_ = std::move(rows.value());
    if (auto err = check_reply_size(request(), *model_, rows_, wanted_,
                                    static_cast<uint64_t>(core_->config().max_message_bytes))) {
      return err;
    }
    if (core_->stopping()) return core_->shutting_down();
    clock_.rows = rows_.size();
    clock_.decoded = now_ns();
    return std::nullopt;
  }

  // The model a sequence step runs on: the request's, or the open sequence's version.
  std::optional<Error> sequence_model(const ModelPtr& model, const std::optional<std::string>& version) {
    if (!model->streamable) {
      return Error::of(ErrorKind::kNotStreamable,
                       model->name + " reads whole sequences (bidirectional), so it has no stateful sequences: "
                                     "send the request without sequence_id for a stateless inference of the whole sequence");
    }
    model_ = model;
    if (control_.start) return std::nullopt;
    auto found = core_->session(session_id_for(request().model_name(), *control_.id));
    if (!found.ok()) return not_open(*control_.id, request().model_name(), found.error());
    session_ = found.value();
    const ModelSpec& running = *session_->model;
    if (version && *version != std::to_string(running.version)) {
      return Error::invalid("sequence " + control_.id->repr() + " runs on " + running.name + " version " +
                                std::to_string(running.version) + ", not " + *version,
                            "version");
    }
    model_ = session_->model;
    return std::nullopt;
  }

  // -- a sequence's step --
  void step_sequence() {
    if (rows_.size() != 1) {
      return fail(Error::invalid("a sequence request carries one row (batch 1), got " + std::to_string(rows_.size()) +
                                     ": send " + expected_inputs(*model_),
                                 "inputs"));
    }
    sid_ = session_id_for(model_->name, *control_.id);
    if (control_.start) {  // a start on an open sequence restarts it (as Triton does)
      core_->store().close(sid_);
      auto opened = core_->store().open(model_, sid_);
      if (!opened.ok()) return fail(opened.error());
      session_ = opened.value();
    }
    auto self = shared_from_this();
    core_->stepper().step(session_, PendingStep{rows_[0], std::nullopt, [self](StepOutcome o) { self->stepped(o); }});
  }

  void stepped(const StepOutcome& o) {
    // all or nothing: a failed first step leaves no sequence behind; an end closes exactly this
    // sequence, after its last step
    if ((!o.ok() && control_.start) || (o.ok() && control_.end)) core_->store().close(sid_);
    if (!o.ok()) return fail(o.error);
    clock_.timed(*o.reply);
    answer(std::vector<float>(o.reply->y), 1, o.reply->steps);
  }

  // -- stateless rows: each from fresh state through a throwaway session, batched like any step;
  // in waves of at most kMaxPaddedSteps rows × steps (a batch's memory grows with rows × T) --
  void step_wave() {
    const size_t steps = rows_[0].steps, wave = std::max<size_t>(1, kMaxPaddedSteps / steps);
    const size_t first = rows_done_, last = std::min(rows_.size(), first + wave);
    outcomes_.assign(last - first, StepOutcome{});
    throwaway_.assign(last - first, "");
    remaining_.store(static_cast<int>(last - first) + 1);  // +1: this loop's own hold
    auto self = shared_from_this();
    std::vector<Stepper::Call> calls;
    for (size_t i = first; i < last; ++i) {
      auto opened = core_->store().open(model_, "");
      if (!opened.ok()) {
        outcomes_[i - first].error = opened.error();
        arrive();
        continue;
      }
      throwaway_[i - first] = opened.value()->id;
      calls.push_back(Stepper::Call{opened.value(), PendingStep{rows_[i], std::nullopt, [self, i, first](StepOutcome o) {
                                      self->outcomes_[i - first] = std::move(o);
                                      self->arrive();
                                    }}});
    }
    core_->stepper().step(std::move(calls));
    arrive();
  }

  void arrive() {
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) wave_done();
  }

  void wave_done() {
    for (const auto& id : throwaway_) {
      if (!id.empty()) core_->store().close(id);
    }
    const size_t per_row = rows_[0].steps * static_cast<size_t>(model_->output_size);
    for (size_t i = 0; i < outcomes_.size(); ++i) {
      if (!outcomes_[i].ok()) return fail(outcomes_[i].error);
      clock_.timed(*outcomes_[i].reply);
      std::copy(outcomes_[i].reply->y.begin(), outcomes_[i].reply->y.end(), y_.begin() + (rows_done_ + i) * per_row);
    }
    rows_done_ += outcomes_.size();
    if (rows_done_ < rows_.size()) return step_wave();
    answer(std::move(y_), static_cast<int64_t>(rows_.size()), rows_[0].steps);
  }

  // -- a stateless request of a model that reads whole sequences: Python's sequence graph --
  void relay() {
    auto self = shared_from_this();
    core_->bridge_pool().post([self] {
      self->clock_.decoded = now_ns();  // decoded by the bridge: its whole call counts as compute_infer
      BridgeReply reply = self->core_->bridge()(kInferMethod, self->call_->bytes, "");
      self->clock_.computed = now_ns();
      Answer a;
      if (reply.code != 0) {
        a.status = grpc::Status(static_cast<grpc::StatusCode>(reply.code), reply.message, reply.details);
      } else if (reply.messages.empty() || !a.response.ParseFromString(reply.messages[0])) {
        a.status = grpc::Status(grpc::StatusCode::INTERNAL, "internal error: the bridge answered no ModelInferResponse");
      }
      self->finish(std::move(a));
    });
  }

  void answer(std::vector<float> y, int64_t rows, int64_t steps) {
    clock_.computed = now_ns();
    Answer a;
    a.response.set_model_name(model_->name);
    a.response.set_model_version(std::to_string(model_->version));
    a.response.set_id(request().id());
    fill_outputs(*model_, std::move(y), rows, steps, wanted_, &a.response);
    finish(std::move(a));
  }

  void fail(const Error& err) { finish(Answer{grpc::Status(grpc_code(err.kind), err.message), {}}); }

  void finish(Answer a) {
    if (!a.status.ok()) {
      stats_->failed(clock_);
    } else {
      if (!model_) clock_.rows = bridged_rows(request());
      stats_->succeeded(clock_);
    }
    done_(std::move(a));
  }

  // The rows of a request the bridge answered (it checked them): one text, or the batch dim.
  static uint64_t bridged_rows(const inf::ModelInferRequest& r) {
    const auto& t = r.inputs(0);
    return t.datatype() == "BYTES" ? 1 : static_cast<uint64_t>(t.shape(0));
  }

  Core* const core_;
  Statistics* const stats_;
  const CallPtr call_;
  const Answered done_;
  Clock clock_;
  SequenceControl control_;
  ModelPtr model_;
  std::vector<Wanted> wanted_;
  Rows rows_;
  SessionPtr session_;
  std::string sid_;
  // stateless
  size_t rows_done_ = 0;
  std::vector<float> y_;  // (B, T, O)
  std::vector<StepOutcome> outcomes_;
  std::vector<std::string> throwaway_;
  std::atomic<int> remaining_{0};
};

// ---- wire ---------------------------------------------------------------------------------------

std::string bytes_of(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (buffer.Dump(&slices).ok()) {
    for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return bytes;
}

// The bytes as a request, or nothing when they do not parse.
CallPtr parsed_call(const grpc::ByteBuffer& buffer) {
  auto call = std::make_shared<Call>();
  call->bytes = bytes_of(buffer);
  if (!call->request.ParseFromString(call->bytes)) return nullptr;
  return call;
}

grpc::Status malformed(const google::protobuf::Message& type = inf::ModelInferRequest::default_instance()) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "malformed request: the bytes are not a valid " +
                                                              type.GetDescriptor()->full_name() + " message");
}

grpc::ByteBuffer buffer_of(const google::protobuf::Message& message) {
  grpc::ByteBuffer out;
  bool own = false;
  grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, &out, &own);
  return out;
}

// A stream's reply: the response, or the error as "[CODE] message" with the request's names.
inf::ModelStreamInferResponse stream_reply(const inf::ModelInferRequest& request, Answer a) {
  inf::ModelStreamInferResponse reply;
  if (a.status.ok()) {
    reply.mutable_infer_response()->Swap(&a.response);
    return reply;
  }
  reply.set_error_message("[" + std::string(code_name(a.status.error_code())) + "] " + a.status.error_message());
  auto* r = reply.mutable_infer_response();
  r->set_model_name(request.model_name());
  r->set_model_version(request.model_version());
  r->set_id(request.id());
  return reply;
}

// ---- ModelStreamInfer: one reply per request, in request order --------------------------------
//
// Requests of different sequences run concurrently (so the scheduler batches them); requests of
// one sequence run one after another in arrival order, start and end included (a chain per
// sequence key). A bad request gets an error reply and the stream goes on; a message that does
// not parse ends it with INVALID_ARGUMENT once the requests before it are answered. Past
// kMaxInFlightPerStream unanswered requests the stream stops reading until replies drain.

class InferStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  InferStream(Core* core, Statistics* stats) : core_(core), stats_(stats) { Read(); }

  void OnReadDone(bool ok) override {
    CallPtr call = ok ? parsed_call(request_) : nullptr;
    std::unique_lock<std::mutex> lock(mu_);
    reading_ = false;
    if (!call) {  // the client half-closed (or went away), or the bytes are not a request
      closed_ = true;
      if (ok) end_ = malformed();
      return WriteOrFinish(lock);
    }
    const size_t slot = base_ + slots_.size();
    slots_.emplace_back();  // unanswered: the stream cannot finish before Run answers it
    const std::string key = sequence_key(call->request);
    bool run_now = key.empty();
    if (!run_now) {
      auto& chain = chains_[key];
      chain.push_back({slot, call});
      run_now = chain.size() == 1;  // otherwise it runs when the one before it answers
    }
    const bool more = slots_.size() < kMaxInFlightPerStream;
    reading_ = more;
    lock.unlock();
    if (more) StartRead(&request_);
    if (run_now) Run(slot, call, key);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) broken_ = true;  // the client went away: what still runs finishes unwritten
    const bool resume = !reading_ && !closed_ && !broken_ && slots_.size() < kMaxInFlightPerStream;
    if (resume) reading_ = true;  // and so the stream cannot finish before the read is back
    WriteOrFinish(lock);
    if (resume) StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  struct Queued {
    size_t slot;
    CallPtr call;
  };

  void Read() {
    reading_ = true;
    StartRead(&request_);
  }

  void Run(size_t slot, const CallPtr& call, const std::string& key) {
    Inference::run(core_, stats_, call, [this, slot, call, key](Answer a) {
      Deliver(slot, key, buffer_of(stream_reply(call->request, std::move(a))));
    });
  }

  // Nothing touches `this` after WriteOrFinish unless a request is still unanswered (the next
  // of this sequence), which keeps the stream from finishing.
  void Deliver(size_t slot, const std::string& key, grpc::ByteBuffer reply) {
    std::optional<Queued> next;
    std::unique_lock<std::mutex> lock(mu_);
    slots_[slot - base_] = std::move(reply);
    if (!key.empty()) {
      auto chain = chains_.find(key);
      chain->second.pop_front();
      if (chain->second.empty()) {
        chains_.erase(chain);
      } else {
        next = chain->second.front();
      }
    }
    WriteOrFinish(lock);
    if (next) Run(next->slot, next->call, key);
  }

  // One write at a time, the oldest reply first; the status once every reply is out. Releases
  // the lock (gRPC's Start*/Finish are never called holding it).
  void WriteOrFinish(std::unique_lock<std::mutex>& lock) {
    while (broken_ && !slots_.empty() && slots_.front()) Pop();
    if (!writing_ && !broken_ && !slots_.empty() && slots_.front()) {
      out_ = std::move(*slots_.front());
      Pop();
      writing_ = true;
      lock.unlock();
      StartWrite(&out_);
      return;
    }
    if (finished_ || reading_ || writing_ || !slots_.empty() || !(closed_ || broken_)) return lock.unlock();
    finished_ = true;
    const grpc::Status status = broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "the client went away") : end_;
    lock.unlock();
    core_->metrics().request("ModelStreamInfer", code_name(status.error_code()));
    Finish(status);
  }

  void Pop() {
    slots_.pop_front();
    ++base_;
  }

  Core* const core_;
  Statistics* const stats_;
  grpc::ByteBuffer request_, out_;
  std::mutex mu_;  // guards everything below
  std::deque<std::optional<grpc::ByteBuffer>> slots_;  // replies owed, in request order
  size_t base_ = 0;                                     // the request number of slots_.front()
  std::unordered_map<std::string, std::deque<Queued>> chains_;  // front: the one running
  bool reading_ = false, writing_ = false, closed_ = false, broken_ = false, finished_ = false;
  grpc::Status end_;  // OK, or why the stream ends (a message that did not parse)
};

// ---- the service --------------------------------------------------------------------------------

using Base = inf::GRPCInferenceService::WithRawCallbackMethod_ModelInfer<
    inf::GRPCInferenceService::WithRawCallbackMethod_ModelStreamInfer<
        inf::GRPCInferenceService::WithRawCallbackMethod_ModelStatistics<inf::GRPCInferenceService::Service>>>;

class OipService final : public Base {
 public:
  explicit OipService(Core* core) : core_(core) {
    const auto* d = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
        inf::GRPCInferenceService::service_full_name());
    const std::set<std::string> native(std::begin(kNative), std::end(kNative));
    for (int i = 0; i < d->method_count(); ++i) {
      if (!native.count(d->method(i)->name())) MarkMethodGeneric(i);  // served by the bridge
    }
  }

  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override {
    auto* reactor = ctx->DefaultReactor();
    CallPtr call = parsed_call(*request);
    if (!call) {
      finish_unary(core_, reactor, malformed());
      return reactor;
    }
    Core* core = core_;
    Inference::run(core_, &stats_, call, [core, reactor, response](Answer a) {
      const grpc::Status& s = a.status;
      if (!s.ok()) {
        return finish_unary(core, reactor, grpc::Status(s.error_code(), clipped(s.error_message()), s.error_details()));
      }
      grpc::ByteBuffer reply = buffer_of(a.response);
      response->Swap(&reply);
      finish_unary(core, reactor, s);
    });
    return reactor;
  }

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ModelStreamInfer(grpc::CallbackServerContext*) override {
    return new InferStream(core_, &stats_);
  }

  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                            grpc::ByteBuffer* response) override {
    auto* reactor = ctx->DefaultReactor();
    inf::ModelStatisticsRequest req;
    if (!req.ParseFromString(bytes_of(*request))) return finish_statistics(reactor, malformed(req));
    auto models = models_named(core_, req.name(), req.version());
    if (!models.ok()) {
      const Error& e = models.error();
      return finish_statistics(reactor, grpc::Status(grpc_code(e.kind), clipped(e.message)));
    }
    inf::ModelStatisticsResponse reply;
    for (const auto& m : models.value()) fill_statistics(core_, *m, stats_.snapshot(*m), reply.add_model_stats());
    grpc::ByteBuffer bytes = buffer_of(reply);
    response->Swap(&bytes);
    return finish_statistics(reactor, grpc::Status::OK);
  }

 private:
  static void finish_unary(Core* core, grpc::ServerUnaryReactor* reactor, const grpc::Status& status) {
    core->metrics().request("ModelInfer", code_name(status.error_code()));
    reactor->Finish(status);
  }

  // counted under the name the bridge counted it by before it was served here
  grpc::ServerUnaryReactor* finish_statistics(grpc::ServerUnaryReactor* reactor, const grpc::Status& status) {
    core_->metrics().request(kStatisticsMethod, code_name(status.error_code()));
    reactor->Finish(status);
    return reactor;
  }

  Core* core_;
  Statistics stats_;
};

}  // namespace

std::unique_ptr<grpc::Service> make_oip_service(Core* core) { return std::make_unique<OipService>(core); }

}  // namespace rnnserve
