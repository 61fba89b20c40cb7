// SPDX-License-Identifier: MIT
/// @file bfloat16 and float16: exact round-to-nearest-even conversion and lossless round trips.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include <moba/dtype.hpp>

namespace {

/// Independent RNE by enumeration: the nearest of all finite values, ties to the even bit pattern.
template <class H>
std::uint16_t nearest_by_search(double x) {
  std::uint16_t best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const double y = static_cast<double>(H::from_bits(static_cast<std::uint16_t>(b)));
    if (!std::isfinite(y) || std::signbit(y) != std::signbit(x)) continue;
    const double err = std::abs(y - x);
    if (err < best_err || (err == best_err && (b & 1) == 0)) {
      best_err = err;
      best = static_cast<std::uint16_t>(b);
    }
  }
  return best;
}

}  // namespace

TEST_CASE_TEMPLATE("every 16-bit pattern survives a round trip through float and double", H, moba::bfloat16,
                   moba::float16) {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const H h = H::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    if (std::isnan(f)) {
      CHECK(std::isnan(static_cast<float>(H(f))));
      continue;
    }
    REQUIRE(H(f).bits == b);
    REQUIRE(H(static_cast<double>(h)).bits == b);
  }
}

TEST_CASE_TEMPLATE("conversion rounds to nearest, ties to even", H, moba::bfloat16, moba::float16) {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> mantissa(-2.0, 2.0);
  std::uniform_int_distribution<int> exponent(-26, 15);
  for (int n = 0; n < 200; ++n) {
    const double x = std::ldexp(mantissa(rng), exponent(rng));
    CAPTURE(x);
    const std::uint16_t want = nearest_by_search<H>(x);
    // Values past the largest finite number by half an ulp or more round to infinity; skip those here.
    if (std::abs(x) > static_cast<double>(H::from_bits(0x7bff)) && std::is_same_v<H, moba::float16>) continue;
    CHECK(H(x).bits == want);
    if (static_cast<double>(static_cast<float>(x)) == x) CHECK(H(static_cast<float>(x)).bits == want);
  }
  // Exact ties between neighbours go to the even pattern; from double there is no double rounding.
  const double one = 1.0, ulp = std::is_same_v<H, moba::bfloat16> ? 0x1p-7 : 0x1p-10;
  CHECK(H(one + ulp / 2).bits == H(one).bits);                              // tie -> even (1.0)
  CHECK(H(one + 3 * ulp / 2).bits == H(one + 2 * ulp).bits);                // tie -> even (1 + 2 ulp)
  CHECK(H(one + ulp / 2 + 0x1p-40).bits == H(one + ulp).bits);             // just above the tie
}

TEST_CASE_TEMPLATE("the fast float paths equal the exact definitions on every pattern and on random floats", H,
                   moba::bfloat16, moba::float16) {
  using format = std::conditional_t<std::is_same_v<H, moba::bfloat16>, moba::detail::bfloat16_format,
                                    moba::detail::float16_format>;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const float fast = static_cast<float>(H::from_bits(static_cast<std::uint16_t>(b)));
    const float exact = format::decode(static_cast<std::uint16_t>(b));
    REQUIRE((fast == exact || (std::isnan(fast) && std::isnan(exact))));
    REQUIRE(std::signbit(fast) == std::signbit(exact));
  }
  std::mt19937 rng(std::random_device{}());
  for (int n = 0; n < 1000000; ++n) {
    const float x = moba::detail::bits_float(static_cast<std::uint32_t>(rng()));
    if (std::isnan(x)) continue;
    REQUIRE_MESSAGE(H(x).bits == format::encode(x), x);
  }
}

TEST_CASE("float16 specials: overflow to infinity, subnormals, signed zero, NaN") {
  CHECK(std::isinf(static_cast<float>(moba::float16(65520.0))));       // halfway past max rounds up
  CHECK(static_cast<float>(moba::float16(65519.0)) == 65504.0f);
  CHECK(moba::float16(0x1p-24).bits == 0x0001);                         // smallest subnormal
  CHECK(moba::float16(0x1p-25).bits == 0x0000);                         // tie with zero -> even (zero)
  CHECK(moba::float16(0x1.8p-25).bits == 0x0001);
  CHECK(moba::float16(-0.0).bits == 0x8000);
  CHECK(std::isnan(static_cast<float>(moba::float16(std::nan("")))));
  CHECK(std::isnan(static_cast<float>(moba::bfloat16(std::nanf("")))));
  CHECK(std::isinf(static_cast<float>(moba::bfloat16(std::numeric_limits<double>::max()))));
}
