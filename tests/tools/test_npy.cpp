// SPDX-License-Identifier: MIT
/// @file The .npy reader and writer: round trips, NumPy's header forms, and rejection of bad files.
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "npy.hpp"

namespace npy = moba_ref::npy;

namespace {
std::string preamble(const std::string& dict, int version = 1) {
  std::string h = "\x93NUMPY";
  h += static_cast<char>(version);
  h += '\0';
  if (version == 1) {
    h += static_cast<char>(dict.size() & 0xff);
    h += static_cast<char>(dict.size() >> 8);
  } else {
    for (int b = 0; b < 4; ++b) h += static_cast<char>(dict.size() >> (8 * b) & 0xff);
  }
  return h + dict;
}
npy::array parse(const std::string& bytes) { return npy::parse(bytes.data(), bytes.size()); }
}  // namespace

TEST_CASE("write then read returns the same descr, shape and bytes, with a 64-byte aligned header") {
  std::mt19937 rng(std::random_device{}());
  std::vector<float> x(3 * 5 * 7);
  for (auto& e : x) e = std::normal_distribution<float>()(rng);
  const auto path = (std::filesystem::temp_directory_path() / ("npy_" + std::to_string(rng()) + ".npy")).string();
  npy::write(path, "<f4", {3, 5, 7}, x.data(), x.size() * 4);
  const npy::array a = npy::read(path);
  CHECK(a.descr == "<f4");
  CHECK(a.shape == std::vector<std::int64_t>{3, 5, 7});
  REQUIRE(a.data.size() == x.size() * 4);
  CHECK(std::memcmp(a.data.data(), x.data(), a.data.size()) == 0);
  CHECK(std::filesystem::file_size(path) - a.data.size() == 128);  // header padded to 64
  std::remove(path.c_str());
}

TEST_CASE("NumPy's header forms parse: 1-tuples, empty shapes, version 2, any key order") {
  const std::string one =
      preamble("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }\n") + std::string(8, '\1');
  CHECK(parse(one).shape == std::vector<std::int64_t>{2});
  const std::string scalar = preamble("{'shape': (), 'fortran_order': False, 'descr': '<f8'}") + std::string(8, '\0');
  CHECK(parse(scalar).shape.empty());
  const std::string v2 = preamble("{'descr': '<u2', 'fortran_order': False, 'shape': (0, 3), }", 2);
  CHECK(parse(v2).count() == 0);
}

TEST_CASE("malformed or unsupported files are rejected with a message") {
  const std::string good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  CHECK_THROWS_WITH_AS(parse("NUMPY"), "not a .npy file (bad magic)", npy::error);
  CHECK_THROWS_WITH_AS(parse(preamble(good).substr(0, 20)), "truncated .npy header", npy::error);
  CHECK_THROWS_WITH_AS(parse(preamble(good) + std::string(4, 'x')), doctest::Contains("needs 2 elements of 4 bytes"),
                       npy::error);
  CHECK_THROWS_WITH_AS(parse(preamble("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }") + "abcd"),
                       doctest::Contains("unsupported dtype '>f4'"), npy::error);
  CHECK_THROWS_WITH_AS(parse(preamble("{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }") + "abcd"),
                       doctest::Contains("Fortran-order"), npy::error);
  CHECK_THROWS_WITH_AS(parse(preamble("{'descr': '<f4', 'shape': (1,), }") + "abcd"),
                       doctest::Contains("lacks fortran_order"), npy::error);
  CHECK_THROWS_WITH_AS(
      parse(preamble("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }")),
      doctest::Contains("overflows 64 bits"), npy::error);
  CHECK_THROWS_WITH_AS(
      parse(preamble("{'descr': '<f4', 'fortran_order': False, 'shape': (8589934592, 1073741824, 0), }")),
      doctest::Contains("overflows 64 bits"), npy::error);  // empty, but count() would overflow
  CHECK_THROWS_AS(parse(preamble("{'descr': '<f4', 'fortran_order': False, 'shape': (1,")), npy::error);
  CHECK_THROWS_AS(npy::read("/nonexistent/x.npy"), npy::error);
}

TEST_CASE("a header must be one dictionary naming descr, fortran_order and shape once each") {
  const std::string four = "abcd";
  for (const char* dict : {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'shape': (1,)}",
                           "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
                           "{'fortran_order': False, 'descr': '<f4', 'fortran_order': True, 'shape': (1,)}"}) {
    CAPTURE(dict);
    CHECK_THROWS_WITH_AS(parse(preamble(dict) + four), doctest::Contains("duplicate key"), npy::error);
  }
  CHECK_THROWS_WITH_AS(parse(preamble("{'fortran_order': False, 'shape': (1,)}") + four),
                       doctest::Contains("lacks descr"), npy::error);
  CHECK_THROWS_WITH_AS(parse(preamble("{'descr': '<f4', 'fortran_order': False}") + four),
                       doctest::Contains("lacks shape"), npy::error);
  for (const std::string& tail : std::vector<std::string>{"x", "}", "{}", " , ", std::string("\n\0", 2)}) {
    CAPTURE(tail);
    const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }" + tail;
    CHECK_THROWS_WITH_AS(parse(preamble(dict) + four), doctest::Contains("after the dictionary"), npy::error);
  }
  // NumPy's own padding (spaces, then a newline) is fine.
  CHECK(parse(preamble("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }      \n") + four).count() == 1);
}

TEST_CASE("data one byte shorter or longer than the shape needs is rejected; shapes overflowing 64 bits too") {
  const std::string h = preamble("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }");
  CHECK(parse(h + std::string(24, '\0')).count() == 6);
  CHECK_THROWS_WITH_AS(parse(h + std::string(23, '\0')), doctest::Contains("data holds 23 bytes"), npy::error);
  CHECK_THROWS_WITH_AS(parse(h + std::string(25, '\0')), doctest::Contains("data holds 25 bytes"), npy::error);
  // 2^32 * 2^32 wraps to 0 in 64 bits, which a naive product would take for an empty array.
  CHECK_THROWS_WITH_AS(parse(preamble("{'descr': '<u2', 'fortran_order': False, 'shape': (4294967296, 4294967296), }")),
                       doctest::Contains("overflows 64 bits"), npy::error);
  // Fits int64 as elements, but not as bytes.
  CHECK_THROWS_WITH_AS(parse(preamble("{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904,), }")),
                       doctest::Contains("needs"), npy::error);
}

TEST_CASE("header() parses back to the same descr and shape for every shape rank") {
  for (const std::vector<std::int64_t>& shape :
       std::vector<std::vector<std::int64_t>>{{}, {0}, {3}, {2, 0, 5}, {2, 3, 4}}) {
    const npy::array a = parse(npy::header("<f2", shape) + std::string(2 * npy::array{"<f2", shape, {}}.count(), '\7'));
    CHECK(a.descr == "<f2");
    CHECK(a.shape == shape);
    CHECK(npy::header("<f2", shape).size() % 64 == 0);
  }
  CHECK_THROWS_AS(npy::header(">f8", {1}), npy::error);
}

TEST_CASE("failed writes and reads throw naming the file: a full disk, a folder, a missing parent") {
  const float x[2] = {1, 2};
  // /dev/full accepts the open and fails the write: this small file only reaches it at the flush.
  CHECK_THROWS_WITH_AS(npy::write("/dev/full", "<f4", {2}, x, sizeof x), doctest::Contains("cannot write '/dev/full'"),
                       npy::error);
  CHECK_THROWS_WITH_AS(npy::write_file("/dev/full", {"{}"}), doctest::Contains("No space left"), npy::error);
  CHECK_THROWS_WITH_AS(npy::write("/nonexistent/x.npy", "<f4", {2}, x, sizeof x),
                       doctest::Contains("cannot create '/nonexistent/x.npy'"), npy::error);
  CHECK_THROWS_AS(npy::write("/dev/null", "<f4", {3}, x, sizeof x), std::logic_error);  // 3 elements, 2 given
  CHECK_THROWS_WITH_AS(npy::read(std::filesystem::temp_directory_path().string()), doctest::Contains("cannot read"),
                       npy::error);
}

TEST_CASE("read stops where the header says the data ends: endless streams and long files cost no memory") {
  // /dev/zero never ends; reading it whole would exhaust memory before the magic was looked at.
  CHECK_THROWS_WITH_AS(npy::read("/dev/zero"), doctest::Contains("bad magic"), npy::error);
  const auto path =
      (std::filesystem::temp_directory_path() / ("npy_long_" + std::to_string(::getpid()) + ".npy")).string();
  npy::write_file(path, {npy::header("<i8", {2}), std::string(16 + 3, '\0')});
  CHECK_THROWS_WITH_AS(npy::read(path), doctest::Contains("data holds more than 16 bytes"), npy::error);
  npy::write_file(path, {npy::header("<i8", {2}), std::string(15, '\0')});
  CHECK_THROWS_WITH_AS(npy::read(path), doctest::Contains("data holds 15 bytes"), npy::error);
  npy::write_file(path, {npy::header("<i8", {2}), std::string(16, '\0')});
  CHECK(npy::read(path).data.size() == 16);
  npy::write_file(path, {npy::header("<i8", {2}).substr(0, 40)});
  CHECK_THROWS_WITH_AS(npy::read(path), doctest::Contains("truncated .npy header"), npy::error);
  std::remove(path.c_str());
}
