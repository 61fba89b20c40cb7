// SPDX-License-Identifier: MIT
/// @file A small reader and writer of NumPy's .npy format (versions 1–3, little endian, C order).
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moba_ref::npy {

/// A malformed or unsupported file; the message says what and where.
struct error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The element types moba-ref reads and writes; bf16 travels as `<u2` bit patterns.
inline std::size_t item_size(std::string_view descr) {
  if (descr == "<f8" || descr == "<i8") return 8;
  if (descr == "<f4" || descr == "<i4") return 4;
  if (descr == "<f2" || descr == "<u2") return 2;
  throw error("unsupported dtype '" + std::string(descr) + "' (expected <f8, <f4, <f2, <u2, <i4 or <i8)");
}

struct array {
  std::string descr;
  std::vector<std::int64_t> shape;
  std::vector<char> data;  // count() * item_size(descr) bytes

  std::int64_t count() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

namespace detail {

/// Cursor over the header dictionary, e.g. `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
struct header_parser {
  std::string_view s;
  std::size_t at = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw error("malformed .npy header at character " + std::to_string(at) + ": " + what);
  }
  void skip_space() {
    while (at < s.size() && (s[at] == ' ' || s[at] == '\t' || s[at] == '\n')) ++at;
  }
  bool accept(char c) {
    skip_space();
    if (at < s.size() && s[at] == c) {
      ++at;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!accept(c)) fail(std::string("expected '") + c + "'");
  }
  std::string quoted() {
    skip_space();
    if (at >= s.size() || (s[at] != '\'' && s[at] != '"')) fail("expected a quoted string");
    const char quote = s[at++];
    const std::size_t end = s.find(quote, at);
    if (end == std::string_view::npos) fail("unterminated string");
    std::string out(s.substr(at, end - at));
    at = end + 1;
    return out;
  }
  std::int64_t integer() {
    skip_space();
    std::int64_t v = 0;
    const std::size_t start = at;
    while (at < s.size() && s[at] >= '0' && s[at] <= '9') {
      if (v > (INT64_MAX - 9) / 10) fail("dimension too large");
      v = v * 10 + (s[at++] - '0');
    }
    if (at == start) fail("expected a dimension");
    if (at < s.size() && s[at] == 'L') ++at;  // Python 2 long suffix
    return v;
  }
  bool boolean() {
    skip_space();
    if (s.substr(at, 4) == "True") return at += 4, true;
    if (s.substr(at, 5) == "False") return at += 5, false;
    fail("expected True or False");
  }
};

}  // namespace detail

/// Parses a whole .npy file held in memory. Throws npy::error on anything malformed or unsupported.
inline array parse(const char* bytes, std::size_t size) {
  constexpr std::string_view magic("\x93NUMPY", 6);
  if (size < 10 || std::string_view(bytes, 6) != magic) throw error("not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(bytes[6]);
  std::size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8;
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw error("truncated .npy preamble");
    header_len = 0;
    for (int b = 3; b >= 0; --b) header_len = header_len << 8 | static_cast<unsigned char>(bytes[8 + b]);
    offset = 12;
  } else {
    throw error("unsupported .npy version " + std::to_string(major));
  }
  if (header_len > size - offset) throw error("truncated .npy header");
  detail::header_parser p{std::string_view(bytes + offset, header_len)};

  array a;
  bool have_descr = false, have_order = false, have_shape = false, fortran = false;
  p.expect('{');
  while (!p.accept('}')) {
    const std::string key = p.quoted();
    p.expect(':');
    if (key == "descr") {
      a.descr = p.quoted();
      have_descr = true;
    } else if (key == "fortran_order") {
      fortran = p.boolean();
      have_order = true;
    } else if (key == "shape") {
      p.expect('(');
      while (!p.accept(')')) {
        a.shape.push_back(p.integer());
        if (!p.accept(',')) {
          p.expect(')');
          break;
        }
      }
      have_shape = true;
    } else {
      p.fail("unknown key '" + key + "'");
    }
    if (!p.accept(',')) {
      p.expect('}');
      break;
    }
  }
  if (!have_descr || !have_order || !have_shape) throw error(".npy header lacks descr, fortran_order or shape");
  if (fortran) throw error("Fortran-order arrays are not supported; save with np.ascontiguousarray");
  const std::size_t item = item_size(a.descr);
  // The product of the non-zero dims must fit int64, so that count() never overflows.
  std::uint64_t count = 1;
  bool empty = false;
  for (auto dim : a.shape) {
    if (dim == 0) empty = true;
    else if (count > static_cast<std::uint64_t>(INT64_MAX) / static_cast<std::uint64_t>(dim)) throw error("shape overflows");
    else count *= static_cast<std::uint64_t>(dim);
  }
  if (empty) count = 0;
  const std::size_t payload = size - offset - header_len;
  if (count > payload / item || count * item != payload) {
    throw error("data holds " + std::to_string(payload) + " bytes but the shape needs " +
                std::to_string(count) + " elements of " + std::to_string(item) + " bytes");
  }
  a.data.assign(bytes + offset + header_len, bytes + size);
  return a;
}

inline array read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw error("cannot open '" + path + "'");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    return parse(bytes.data(), bytes.size());
  } catch (const error& e) {
    throw error(path + ": " + e.what());
  }
}

/// Writes a version 1.0 file whose header is padded to a multiple of 64 bytes, as NumPy does.
inline void write(const std::string& path, const std::string& descr, const std::vector<std::int64_t>& shape,
                  const void* data) {
  std::string dims;
  for (std::size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ',';  // a Python 1-tuple
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  const std::size_t unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  std::ofstream out(path, std::ios::binary);
  const char preamble[10] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<char>(dict.size() & 0xff),
                             static_cast<char>(dict.size() >> 8)};
  out.write(preamble, 10);
  out << dict;
  std::int64_t count = 1;
  for (auto dim : shape) count *= dim;
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(count * item_size(descr)));
  if (!out) throw error("cannot write '" + path + "'");
}

}  // namespace moba_ref::npy
