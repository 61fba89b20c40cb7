// SPDX-License-Identifier: MIT
/// @file Host/device 16-bit float types with exact round-to-nearest-even conversion, and dtype_traits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <moba/detail/macros.hpp>

namespace moba {
namespace detail {

/// An IEEE-style binary format with `Mantissa` stored fraction bits and `Exponent` exponent bits.
template <int Exponent, int Mantissa>
struct binary16_format {
  static constexpr int bias = (1 << (Exponent - 1)) - 1;
  static constexpr int emin = 1 - bias;  // smallest normal exponent
  static constexpr std::uint16_t exp_mask = ((1u << Exponent) - 1u) << Mantissa;
  static constexpr std::uint16_t frac_mask = (1u << Mantissa) - 1u;

  /// Decode bits exactly (every value of a 16-bit format is a float).
  MOBA_HOST_DEVICE static float decode(std::uint16_t bits) {
    const bool negative = bits & 0x8000u;
    const int e = (bits & exp_mask) >> Mantissa;
    const int f = bits & frac_mask;
    float magnitude;
    if (e == (1 << Exponent) - 1) {
      magnitude = f ? NAN : INFINITY;
    } else if (e == 0) {
      magnitude = std::ldexp(static_cast<float>(f), emin - Mantissa);
    } else {
      magnitude = std::ldexp(static_cast<float>(f | (1 << Mantissa)), e - bias - Mantissa);
    }
    return negative ? -magnitude : magnitude;
  }

  /// Encode with one rounding, to nearest, ties to even: exact from float or double alike.
  MOBA_HOST_DEVICE static std::uint16_t encode(double x) {
    const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
    if (std::isnan(x)) return sign | exp_mask | (1u << (Mantissa - 1));  // quiet NaN
    const double a = std::fabs(x);
    if (a == 0.0) return sign;
    if (std::isinf(a)) return sign | exp_mask;
    int e;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    int exponent = e - 1;
    if (exponent < emin) exponent = emin;  // subnormals share the smallest normal's quantum
    // a / quantum is exact (a power-of-two scale) and nearbyint rounds ties to even.
    const double units = std::nearbyint(std::ldexp(a, Mantissa - exponent));
    // units may have carried to 2^(Mantissa+1): renormalise.
    long long u = static_cast<long long>(units);
    if (u >= (2ll << Mantissa)) {
      u >>= 1;
      ++exponent;
    }
    if (u < (1ll << Mantissa)) return sign | static_cast<std::uint16_t>(u);  // subnormal (or rounded up to min normal below)
    const int biased = exponent + bias;
    if (biased >= (1 << Exponent) - 1) return sign | exp_mask;  // overflow to infinity
    return sign | static_cast<std::uint16_t>((biased << Mantissa) | (u & frac_mask));
  }
};

using bfloat16_format = binary16_format<8, 7>;
using float16_format = binary16_format<5, 10>;

MOBA_HOST_DEVICE std::uint32_t float_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
MOBA_HOST_DEVICE float bits_float(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// Bit-level conversions between float and the 16-bit formats, exact and fast enough for hot loops;
/// `binary16_format::encode/decode` above are the slow, obviously-correct definitions they are tested against.
struct fast_bfloat16 {
  MOBA_HOST_DEVICE static float decode(std::uint16_t h) { return bits_float(std::uint32_t{h} << 16); }
  MOBA_HOST_DEVICE static std::uint16_t encode(float x) {
    const std::uint32_t u = float_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round half to even
  }
};

struct fast_float16 {
  MOBA_HOST_DEVICE static float decode(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
    if (e == 0) return bits_float(sign | float_bits(static_cast<float>(m) * 0x1p-24f));  // zero or subnormal, exact
    return bits_float(sign | ((e + 112) << 23) | (m << 13));
  }
  MOBA_HOST_DEVICE static std::uint16_t encode(float x) {
    const std::uint32_t u = float_bits(x), a = u & 0x7fffffffu;
    const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    if (a > 0x7f800000u) return sign | 0x7e00u;     // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;    // >= 65520 rounds to infinity
    if (a < 0x38800000u) {                          // below 2^-14: a multiple of 2^-24, scaled exactly
      return sign | static_cast<std::uint16_t>(std::nearbyint(bits_float(a) * 0x1p24f));
    }
    // Round at bit 13 (half to even); a carry moves into the exponent as it should.
    return sign | static_cast<std::uint16_t>(((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10));
  }
};

/// Shared body of bfloat16 and float16: 16 bits with exact round-to-nearest-even conversion.
template <class Format, class Fast, class Derived>
struct binary16 {
  std::uint16_t bits;

  binary16() = default;
  MOBA_HOST_DEVICE explicit binary16(float x) : bits(Fast::encode(x)) {}
  MOBA_HOST_DEVICE explicit binary16(double x) : bits(Format::encode(x)) {}  // one rounding, not two
  MOBA_HOST_DEVICE explicit operator float() const { return Fast::decode(bits); }
  MOBA_HOST_DEVICE explicit operator double() const { return Fast::decode(bits); }

  MOBA_HOST_DEVICE static Derived from_bits(std::uint16_t b) {
    Derived d;
    d.bits = b;
    return d;
  }
  MOBA_HOST_DEVICE friend bool operator==(Derived a, Derived b) { return a.bits == b.bits; }
};

}  // namespace detail

/// bfloat16: 1 sign, 8 exponent, 7 fraction bits; layout-compatible with __nv_bfloat16.
struct bfloat16 : detail::binary16<detail::bfloat16_format, detail::fast_bfloat16, bfloat16> {
  using binary16::binary16;
};

/// IEEE binary16: 1 sign, 5 exponent, 10 fraction bits; layout-compatible with __half.
struct float16 : detail::binary16<detail::float16_format, detail::fast_float16, float16> {
  using binary16::binary16;
};

static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>);
static_assert(sizeof(float16) == 2 && std::is_trivially_copyable_v<float16>);

/// What each element type computes in. `accum` is used for softmax statistics and lse; `gate` for
/// block means and gate scores (SPEC §Blocks 2–3: at least fp32, fp64 for double).
template <class T>
struct dtype_traits;

template <>
struct dtype_traits<double> {
  using accum = double;
  using gate = double;
  static constexpr const char* name = "f64";
};

/// float and the 16-bit types compute in fp32.
struct fp32_compute {
  using accum = float;
  using gate = float;
};
template <>
struct dtype_traits<float> : fp32_compute {
  static constexpr const char* name = "f32";
};
template <>
struct dtype_traits<float16> : fp32_compute {
  static constexpr const char* name = "f16";
};
template <>
struct dtype_traits<bfloat16> : fp32_compute {
  static constexpr const char* name = "bf16";
};

template <class T>
using accum_t = typename dtype_traits<T>::accum;
template <class T>
using gate_t = typename dtype_traits<T>::gate;

/// Exact widening to double; works for every dtype.
template <class T>
MOBA_HOST_DEVICE double to_double(T x) {
  return static_cast<double>(x);
}

/// Round a double to T once (round to nearest even).
template <class T>
MOBA_HOST_DEVICE T from_double(double x) {
  return static_cast<T>(x);
}

}  // namespace moba
