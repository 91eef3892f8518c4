#include "session_record.h"

#include <zlib.h>

#include <cstring>

#include "bytes.h"
#include "text.h"

namespace rnnserve {

namespace {

constexpr size_t kMagicLength = sizeof(kRecordMagic) - 1;

uint32_t crc_of(const char* data, size_t n) {
  return static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(data), static_cast<uInt>(n)));
}

Error bad_record(const std::string& id, const std::string& why) {
  return Error::of(ErrorKind::kInternal, "session " + py_repr(id) + ": its record in the session store " + why +
                                             "; close it and open a new one");
}

// The 16 lowercase hex digits at bytes[at..at+16) (the caller checked they are there).
bool parse_hex(const std::string& bytes, size_t at, uint64_t* out) {
  uint64_t value = 0;
  for (size_t i = at; i < at + kRecordIndexLength; ++i) {
    const char c = bytes[i];
    const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (digit < 0) return false;
    value = (value << 4) | static_cast<uint64_t>(digit);
  }
  *out = value;
  return true;
}

}  // namespace

std::string index_text(uint64_t index) {
  static const char kHex[] = "0123456789abcdef";
  std::string text(kRecordIndexLength, '0');
  for (size_t i = 0; i < kRecordIndexLength; ++i) text[kRecordIndexLength - 1 - i] = kHex[(index >> (4 * i)) & 0xF];
  return text;
}

std::string encode_record(const std::string& model, uint32_t version, uint64_t next_index, uint64_t incarnation,
                          const Reply* last, const std::vector<float>& state) {
  std::string out;
  out.reserve(64 + model.size() + (state.size() + (last ? last->y.size() : 0)) * sizeof(float));
  out.append(kRecordMagic, kMagicLength);
  out.append(kRecordIndexAt - kMagicLength, '\0');
  out += index_text(next_index);
  out += index_text(incarnation);
  put_text(out, model);
  put<uint32_t>(out, version);
  put<uint8_t>(out, last ? 1 : 0);
  if (last) {
    put<uint64_t>(out, last->step_index);
    put<uint32_t>(out, last->steps);
    put_floats(out, last->y);
  }
  put_floats(out, state);
  put<uint32_t>(out, crc_of(out.data(), out.size()));
  return out;
}

std::optional<std::string> parse_record(const std::string& bytes, SessionRecord* out) {
  if (bytes.size() < 5 || bytes.compare(0, 4, kRecordMagic, 4) != 0) return "is not an rnnserve session record";
  const auto format = static_cast<unsigned char>(bytes[4]);
  if (format != 1 && format != 2) {
    return "has format version " + std::to_string(format) + ", this server reads versions 1 and 2";
  }
  const size_t header = kRecordIncarnationAt + (format == 2 ? kRecordIndexLength : 0);
  if (bytes.size() < header + sizeof(uint32_t)) return "is not an rnnserve session record";
  const size_t body = bytes.size() - sizeof(uint32_t);
  uint32_t stored_crc = 0;
  std::memcpy(&stored_crc, bytes.data() + body, sizeof stored_crc);
  if (stored_crc != crc_of(bytes.data(), body)) return "fails its checksum (corrupt)";
  SessionRecord r;
  if (!parse_hex(bytes, kRecordIndexAt, &r.next_index)) return "is malformed (its step index is not hexadecimal)";
  if (format == 2 && !parse_hex(bytes, kRecordIncarnationAt, &r.incarnation)) {
    return "is malformed (its incarnation is not hexadecimal)";
  }
  ByteReader in(bytes, header, body);
  r.model = in.text();
  r.version = in.get<uint32_t>();
  if (in.get<uint8_t>()) {
    auto last = std::make_shared<Reply>();
    last->step_index = in.get<uint64_t>();
    last->steps = in.get<uint32_t>();
    last->y = in.floats();
    r.last = std::move(last);
  }
  r.state = in.floats();
  if (!in.at_end()) return "is malformed (its fields do not add up)";
  *out = std::move(r);
  return std::nullopt;
}

Result<SessionRecord> decode_record(const std::string& bytes, const std::string& id) {
  SessionRecord r;
  if (auto problem = parse_record(bytes, &r)) return bad_record(id, *problem);
  return r;
}

}  // namespace rnnserve
