// SPDX-License-Identifier: MIT
/// @file A small reader and writer of NumPy's .npy format (versions 1–3, little endian, C order).
/// Nothing read is trusted: the header must be exactly one dictionary with each key once, and the data
/// exactly as long as its shape and dtype say. Every write is checked through fsync and close.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unistd.h>
#include <vector>

namespace moba_ref::npy {

/// A malformed or unsupported file, or a failed read or write; the message says what and where.
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

/// "[400, 4, 16]", for messages.
inline std::string dims(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct array {
  std::string descr;
  std::vector<std::int64_t> shape;
  std::vector<char> data;  // count() * item_size(descr) bytes

  /// Never overflows: parse() refuses shapes whose product does not fit int64.
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

/// Where the header ends (and the data starts), from the preamble in the first 10 or 12 bytes.
inline std::size_t header_end(const char* bytes, std::size_t size) {
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
  return offset + header_len;
}

/// Parses the header in bytes[0, end); returns the array without its data, and in `need` the number
/// of data bytes its shape and dtype say follow.
inline array parse_header(const char* bytes, std::size_t end, std::size_t& need) {
  const std::size_t offset = bytes[6] == 1 ? 10 : 12;
  header_parser p{std::string_view(bytes + offset, end - offset)};

  array a;
  bool have_descr = false, have_order = false, have_shape = false, fortran = false;
  p.expect('{');
  while (!p.accept('}')) {
    const std::size_t key_at = p.at;
    const std::string key = p.quoted();
    p.expect(':');
    bool* seen = nullptr;
    if (key == "descr") seen = &have_descr;
    if (key == "fortran_order") seen = &have_order;
    if (key == "shape") seen = &have_shape;
    if (!seen) p.at = key_at, p.fail("unknown key '" + key + "'");
    // A second value would silently replace the first; NumPy never writes one.
    if (*seen) p.at = key_at, p.fail("duplicate key '" + key + "'");
    *seen = true;
    if (key == "descr") {
      a.descr = p.quoted();
    } else if (key == "fortran_order") {
      fortran = p.boolean();
    } else {
      p.expect('(');
      while (!p.accept(')')) {
        a.shape.push_back(p.integer());
        if (!p.accept(',')) {
          p.expect(')');
          break;
        }
      }
    }
    if (!p.accept(',')) {
      p.expect('}');
      break;
    }
  }
  p.skip_space();  // NumPy pads with spaces and a final newline; anything else is not a header it wrote
  if (p.at != p.s.size()) p.fail("unexpected characters after the dictionary");
  if (!have_descr || !have_order || !have_shape) {
    throw error(std::string(".npy header lacks ") + (!have_descr ? "descr" : !have_order ? "fortran_order" : "shape"));
  }
  if (fortran) throw error("Fortran-order arrays are not supported; save with np.ascontiguousarray");
  const std::size_t item = item_size(a.descr);
  // The product of the non-zero dims must fit int64, so that count() never overflows in any order.
  std::uint64_t count = 1;
  bool empty = false;
  for (auto dim : a.shape) {
    if (dim == 0) {
      empty = true;
    } else if (count > static_cast<std::uint64_t>(INT64_MAX) / static_cast<std::uint64_t>(dim)) {
      throw error("shape " + dims(a.shape) + " overflows 64 bits");
    } else {
      count *= static_cast<std::uint64_t>(dim);
    }
  }
  if (empty) count = 0;
  if (count > (SIZE_MAX - end - 1) / item)
    throw error("shape " + dims(a.shape) + " needs more bytes than memory holds");
  need = count * item;
  return a;
}

/// `have` data bytes ("more than" where `more`) must be the `need` the array's shape says.
inline void check_data(std::size_t have, bool more, std::size_t need, const array& a) {
  if (have == need && !more) return;
  throw error("data holds " + std::string(more ? "more than " : "") + std::to_string(have) + " bytes but the shape " +
              dims(a.shape) + " needs " + std::to_string(need / item_size(a.descr)) + " elements of " +
              std::to_string(item_size(a.descr)) + " bytes");
}

inline std::string errno_text(int err) { return err ? std::strerror(err) : "unknown error"; }

}  // namespace detail

/// Parses a whole .npy file held in memory. Throws npy::error on anything malformed or unsupported.
inline array parse(const char* bytes, std::size_t size) {
  const std::size_t end = detail::header_end(bytes, size);
  if (end > size) throw error("truncated .npy header");
  std::size_t need = 0;
  array a = detail::parse_header(bytes, end, need);
  detail::check_data(size - end, false, need, a);
  a.data.assign(bytes + end, bytes + size);
  return a;
}

/// Reads no more than the header says the file holds, plus one byte: neither a stream without end
/// (/dev/zero) nor a file far longer than its shape makes it use more memory than the array needs.
inline array read(const std::string& path) {
  const std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw error("cannot open '" + path + "': " + detail::errno_text(errno));
  std::vector<char> bytes;
  const auto fill = [&](std::size_t want) {  // up to `want` bytes in all, fewer at the end of the file
    while (bytes.size() < want) {
      const std::size_t have = bytes.size(), chunk = std::min<std::size_t>(want - have, 1 << 24);
      bytes.resize(have + chunk);
      const std::size_t got = std::fread(bytes.data() + have, 1, chunk, f.get());
      bytes.resize(have + got);
      if (std::ferror(f.get())) throw error("cannot read: " + detail::errno_text(errno));
      if (got < chunk) break;
    }
  };
  try {
    fill(12);
    const std::size_t end = detail::header_end(bytes.data(), bytes.size());
    fill(end);
    if (bytes.size() < end) throw error("truncated .npy header");
    std::size_t need = 0;
    array a = detail::parse_header(bytes.data(), end, need);
    fill(end + need + 1);
    detail::check_data(std::min(bytes.size() - end, need), bytes.size() - end > need, need, a);
    bytes.erase(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(end));  // no second copy of the data
    a.data = std::move(bytes);
    return a;
  } catch (const error& e) {
    throw error(path + ": " + e.what());
  }
}

/// The preamble and header of a version 1.0 file, padded to a multiple of 64 bytes as NumPy does.
inline std::string header(const std::string& descr, const std::vector<std::int64_t>& shape) {
  item_size(descr);  // only the dtypes this file can read back
  std::string tuple;
  for (std::size_t i = 0; i < shape.size(); ++i) tuple += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) tuple += ',';  // a Python 1-tuple
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + tuple + "), }";
  const std::size_t unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  if (dict.size() > 0xffff) throw error("shape " + dims(shape) + " does not fit a version 1.0 header");
  std::string preamble("\x93NUMPY\x01\x00", 8);  // version 1.0, then the header length, little endian
  preamble += static_cast<char>(dict.size() & 0xff);
  preamble += static_cast<char>(dict.size() >> 8);
  return preamble + dict;
}

/// Creates `path` holding `parts` and checks every step (write, flush, fsync, close): a full disk
/// often shows only at the flush or the close, and a result that is not on disk must not count as written.
inline void write_file(const std::string& path, std::initializer_list<std::string_view> parts) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw error("cannot create '" + path + "': " + detail::errno_text(errno));
  int err = 0;
  for (auto part : parts) {
    // An empty part may have a null data(), which fwrite must not be given.
    if (!err && !part.empty() && std::fwrite(part.data(), 1, part.size(), f) != part.size()) err = errno ? errno : EIO;
  }
  if (!err && std::fflush(f) != 0) err = errno;
  if (!err && ::fsync(::fileno(f)) != 0) err = errno;
  if (std::fclose(f) != 0 && !err) err = errno;
  if (err) throw error("cannot write '" + path + "': " + detail::errno_text(err));
}

/// Writes `bytes` bytes at `data` as an array of `shape`; they must be exactly what the shape needs.
inline void write(const std::string& path, const std::string& descr, const std::vector<std::int64_t>& shape,
                  const void* data, std::size_t bytes) {
  std::uint64_t count = 1;
  for (auto dim : shape) count *= static_cast<std::uint64_t>(dim);
  if (count * item_size(descr) != bytes)
    throw std::logic_error("npy::write: " + path + " has " + std::to_string(bytes) + " bytes for shape " + dims(shape));
  write_file(path, {header(descr, shape), std::string_view(static_cast<const char*>(data), bytes)});
}

}  // namespace moba_ref::npy
