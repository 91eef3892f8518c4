#include "session_blob.h"

#include <openssl/sha.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "bytes.h"
#include "text.h"

namespace rnnserve {

namespace {

constexpr char kBlobMagic[] = "RNSB";
constexpr size_t kMagicLength = sizeof(kBlobMagic) - 1;
constexpr uint8_t kBlobVersion = 1;
constexpr size_t kLengthAt = 8, kHeadLength = 16, kDigestLength = SHA256_DIGEST_LENGTH;
constexpr uint32_t kMaxRank = 8;
// A model has a few states (LSTM: h and c); bounds what a blob that passes its checksum (anyone
// can compute SHA-256) may make the server allocate, and how long an error naming them gets.
constexpr uint32_t kMaxTensors = 64;
constexpr size_t kMaxTensorName = 256;

std::string sha256(const char* data, size_t n) {
  unsigned char digest[kDigestLength];
  SHA256(reinterpret_cast<const unsigned char*>(data), n, digest);
  return std::string(reinterpret_cast<const char*>(digest), kDigestLength);
}

Error bad_blob(const std::string& why) { return Error::invalid("the session blob " + why, "blob"); }

std::string shape_text(const std::vector<uint32_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

std::string tensors_text(const std::vector<BlobTensor>& tensors) {
  std::string out;
  for (const auto& t : tensors) out += (out.empty() ? "" : ", ") + py_repr(t.name) + " " + shape_text(t.shape);
  return out.empty() ? "none" : out;
}

std::vector<BlobTensor> tensors_of(const ModelSpec& m) {
  std::vector<BlobTensor> out;
  for (const auto& s : m.states) {
    out.push_back(BlobTensor{s.name, {static_cast<uint32_t>(s.layers), 1, static_cast<uint32_t>(s.size)}});
  }
  return out;
}

// The tensors' directory; false when it is cut or a shape is absurd.
bool read_tensors(ByteReader& in, std::vector<BlobTensor>* out, uint64_t* values) {
  const auto count = in.get<uint32_t>();
  *values = 0;
  if (count > kMaxTensors) return false;
  for (uint32_t i = 0; i < count && in.ok(); ++i) {
    BlobTensor t;
    t.name = in.text();
    const auto rank = in.get<uint32_t>();
    if (rank > kMaxRank || t.name.size() > kMaxTensorName) return false;
    uint64_t n = 1;
    for (uint32_t d = 0; d < rank; ++d) {
      t.shape.push_back(in.get<uint32_t>());
      n *= t.shape.back();  // <= 2^32 per dim, <= 8 dims: may wrap only for a blob that fails below
    }
    *values += n;
    out->push_back(std::move(t));
  }
  return in.ok();
}

// The blob's parts agree: the directory covers the state exactly, the state is finite, the last
// reply answers the step before the next one.
std::optional<Error> inconsistent(const SessionBlob& b, uint64_t values) {
  const SessionRecord& r = b.record;
  if (values != r.state.size()) {
    return bad_blob("is malformed: its tensors' shapes hold " + std::to_string(values) + " values, its state " +
                    std::to_string(r.state.size()));
  }
  for (float v : r.state) {
    if (!std::isfinite(v)) return bad_blob("holds NaN or Inf in its state");
  }
  if (r.last && r.last->step_index + 1 != r.next_index) {
    return bad_blob("is malformed: its last reply answers step_index " + std::to_string(r.last->step_index) +
                    ", its next step_index is " + std::to_string(r.next_index));
  }
  return std::nullopt;
}

}  // namespace

std::string encode_blob(Session& s) {
  std::string record;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    record = encode_record(s.model->name, s.model->version, s.next_index, s.incarnation, s.last.get(), s.state);
  }
  std::string out(kBlobMagic, kMagicLength);
  put<uint8_t>(out, kBlobVersion);
  out.append(kLengthAt - out.size(), '\0');
  put<uint64_t>(out, 0);  // the length, filled in below
  const auto tensors = tensors_of(*s.model);
  put<uint32_t>(out, static_cast<uint32_t>(tensors.size()));
  for (const auto& t : tensors) {
    put_text(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.shape.size()));
    for (uint32_t d : t.shape) put<uint32_t>(out, d);
  }
  put_text(out, record);
  const uint64_t length = out.size() + kDigestLength;
  std::memcpy(&out[kLengthAt], &length, sizeof length);
  out += sha256(out.data(), out.size());
  return out;
}

Result<SessionBlob> decode_blob(const std::string& bytes) {
  const size_t head = std::min(bytes.size(), kMagicLength);  // a cut magic is a truncated blob
  if (bytes.compare(0, head, kBlobMagic, head) != 0) {
    return bad_blob("is not an rnnserve session export (it does not start with \"RNSB\")");
  }
  if (bytes.size() < kHeadLength + kDigestLength) {
    return bad_blob("is truncated: " + std::to_string(bytes.size()) + " bytes, shorter than any export");
  }
  if (static_cast<uint8_t>(bytes[kMagicLength]) != kBlobVersion) {
    return bad_blob("has format version " + std::to_string(static_cast<uint8_t>(bytes[kMagicLength])) +
                    "; this server reads version " + std::to_string(kBlobVersion));
  }
  uint64_t length = 0;
  std::memcpy(&length, bytes.data() + kLengthAt, sizeof length);
  if (bytes.size() < length) {
    return bad_blob("is truncated: " + std::to_string(bytes.size()) + " of its " + std::to_string(length) + " bytes");
  }
  if (bytes.size() > length) {
    return bad_blob("has " + std::to_string(bytes.size() - length) + " bytes after its end (it is " +
                    std::to_string(length) + " bytes long)");
  }
  const size_t body = bytes.size() - kDigestLength;
  if (bytes.compare(body, kDigestLength, sha256(bytes.data(), body)) != 0) {
    return bad_blob("fails its SHA-256 checksum (corrupt or altered)");
  }
  ByteReader in(bytes, kHeadLength, body);
  SessionBlob blob;
  uint64_t values = 0;
  if (!read_tensors(in, &blob.tensors, &values)) {
    return bad_blob("is malformed: its tensor list is cut short or beyond any model's (at most " +
                    std::to_string(kMaxTensors) + " tensors of rank " + std::to_string(kMaxRank) + ")");
  }
  const std::string record = in.text();
  if (!in.at_end()) return bad_blob("is malformed: its fields do not add up");
  if (auto problem = parse_record(record, &blob.record)) return bad_blob("holds a session record that " + *problem);
  if (auto err = inconsistent(blob, values)) return *err;
  return blob;
}

std::optional<Error> blob_fits(const SessionBlob& blob, const ModelSpec& m) {
  const auto want = tensors_of(m);
  bool same = want.size() == blob.tensors.size();
  for (size_t i = 0; same && i < want.size(); ++i) {
    same = want[i].name == blob.tensors[i].name && want[i].shape == blob.tensors[i].shape;
  }
  if (!same) {
    return Error::of(ErrorKind::kModelMismatch, "the session blob's state tensors are " +
                                                    tensors_text(blob.tensors) + "; " + m.name + " version " +
                                                    std::to_string(m.version) + " here has " + tensors_text(want));
  }
  if (!record_fits(blob.record, m)) {
    return Error::of(ErrorKind::kModelMismatch, "the session blob's last reply has " +
                                                    std::to_string(blob.record.last->y.size()) + " outputs for " +
                                                    std::to_string(blob.record.last->steps) + " time steps; " +
                                                    m.name + " version " + std::to_string(m.version) +
                                                    " here has " + std::to_string(m.output_size) + " per step");
  }
  return std::nullopt;
}

}  // namespace rnnserve
