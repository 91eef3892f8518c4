// Small text helpers that word the core's messages as Python would (repr quoting, %g numbers),
// so they read the same as the messages of the Python handlers behind the bridge.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace rnnserve {

// Python's repr() of a str: 'abc', "it's", with Python's escapes.
std::string py_repr(std::string_view utf8);
// Python's format(x, "g").
std::string py_g(double x);
// UTF-8 → code points; false when the bytes are not valid UTF-8.
bool utf8_decode(std::string_view bytes, std::vector<char32_t>* out);
std::string utf8_encode(char32_t cp);
// The first n code points of a UTF-8 string (Python's s[:n]).
std::string utf8_prefix(std::string_view utf8, size_t n);

}  // namespace rnnserve
