// Little-endian fields in a byte string, written and read front to back: the session store's
// records (session_record) and the export blobs around them (session_blob).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace rnnserve {

template <class T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof value);
}

// A u32 length, then the bytes.
inline void put_text(std::string& out, const std::string& text) {
  put<uint32_t>(out, static_cast<uint32_t>(text.size()));
  out += text;
}

// A u32 count, then the float32 values.
inline void put_floats(std::string& out, const std::vector<float>& values) {
  put<uint32_t>(out, static_cast<uint32_t>(values.size()));
  out.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

// Reads bytes [at, end) field by field; a read past the end fails it and every later read (each
// then returns an empty value), so a cut input is one check at the end, never an overrun.
class ByteReader {
 public:
  ByteReader(const std::string& bytes, size_t at, size_t end) : bytes_(bytes), at_(at), end_(end) {}

  template <class T>
  T get() {
    T value{};
    if (take(sizeof value)) std::memcpy(&value, bytes_.data() + at_ - sizeof value, sizeof value);
    return value;
  }
  std::string text(size_t n) { return take(n) ? bytes_.substr(at_ - n, n) : std::string(); }
  std::string text() { return text(get<uint32_t>()); }  // as put_text wrote it
  std::vector<float> floats() {                         // as put_floats wrote them
    const uint32_t n = get<uint32_t>();
    std::vector<float> values;
    if (!take(static_cast<size_t>(n) * sizeof(float))) return values;
    values.resize(n);
    std::memcpy(values.data(), bytes_.data() + at_ - values.size() * sizeof(float), values.size() * sizeof(float));
    return values;
  }
  bool ok() const { return ok_; }                         // no read went past the end
  bool at_end() const { return ok_ && at_ == end_; }      // and every byte was read

 private:
  bool take(size_t n) {
    if (!ok_ || end_ - at_ < n) return ok_ = false;
    at_ += n;
    return true;
  }
  const std::string& bytes_;
  size_t at_, end_;
  bool ok_ = true;
};

}  // namespace rnnserve
