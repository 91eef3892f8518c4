// A few lines of protobuf wire format, for the google.rpc.Status detail of error replies (its
// .proto files are not part of Debian's protobuf, and the message is four fields deep).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace rnnserve {

class Wire {
 public:
  void varint(uint32_t field, uint64_t value) {
    tag(field, 0);
    raw_varint(value);
  }
  void bytes(uint32_t field, std::string_view value) {
    tag(field, 2);
    raw_varint(value.size());
    out_.append(value.data(), value.size());
  }
  void string(uint32_t field, std::string_view value) { bytes(field, value); }
  std::string take() { return std::move(out_); }

 private:
  void tag(uint32_t field, uint32_t wire_type) { raw_varint((uint64_t{field} << 3) | wire_type); }
  void raw_varint(uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<char>((v & 0x7F) | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<char>(v));
  }
  std::string out_;
};

}  // namespace rnnserve
