// SPDX-License-Identifier: MIT
/// @file bf16 register tiles on AVX512-BF16 (vdpbf16ps: 32 bf16 products summed into 16 fp32 lanes):
/// the two products of kernel.hpp for bfloat16 inputs at twice the fp32 rate. Scores and outputs
/// accumulate in fp32; the probabilities are rounded to bf16 for P·V, as flash-attention does.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <moba/dtype.hpp>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace moba::backends::cpu {

namespace bf16 {
/// Whether a row holds a nonzero value below 2^-100 (bf16 exponent field < 27), denormals among them.
/// vdpbf16ps treats denormal inputs as zero and flushes denormal results (its MXCSR is fixed), so
/// chunks and query tiles holding such values run on the fp32 products instead (SPEC §Precision).
inline bool has_tiny(const bfloat16* x, std::int64_t n) {
  std::uint16_t tiny = 0;
  for (std::int64_t i = 0; i < n; ++i)  // one unsigned compare per element (magnitude in [1, 27 << 7)), vectorised
    tiny |= static_cast<std::uint16_t>((x[i].bits & 0x7fff) - 1) < (27 << 7) - 1;
  return tiny != 0;
}

/// dst[0, dp) = the bits of x[0, d), then zeros; returns has_tiny(x, d).
inline bool copy_bits(const bfloat16* x, std::int64_t d, std::int64_t dp, std::uint16_t* dst) {
  for (std::int64_t i = 0; i < dp; ++i) dst[i] = i < d ? x[i].bits : 0;
  return has_tiny(x, d);
}
}  // namespace bf16

#if defined(__AVX512BF16__)
/// Whether T's products run on vdpbf16ps (compute type fp32, bfloat16 inputs).
template <class T, class A>
inline constexpr bool bf16_dot = std::is_same_v<T, bfloat16> && std::is_same_v<A, float>;

namespace bf16 {

constexpr int keys = 64;  // keys per chunk, as the fp32 tile: 4 vectors of 16 lanes
constexpr int vectors = 4;

inline __m512bh pair_broadcast(const std::uint16_t* two) {
  std::int32_t bits;
  std::memcpy(&bits, two, 4);
  return (__m512bh)_mm512_set1_epi32(bits);
}

/// Keys of a chunk as [Dp/2][keys][2]: for each pair of dims, every key's two values side by side.
inline void pack_key(const bfloat16* key, std::int64_t t, std::int64_t d, std::uint16_t* packed) {
  for (std::int64_t x = 0; x < d; ++x) packed[((x >> 1) * keys + t) * 2 + (x & 1)] = key[x].bits;
}

/// Values of a chunk as [keys/2][Dp][2]: for each pair of keys, both values of every dim side by side.
inline void pack_value(const bfloat16* value, std::int64_t t, std::int64_t d, std::int64_t dp, std::uint16_t* packed) {
  for (std::int64_t x = 0; x < d; ++x) packed[((t >> 1) * dp + x) * 2 + (t & 1)] = value[x].bits;
}

/// S[r][0, 64) = q_r · k over Dp dims for `Rows` rows; q rows hold bf16 bits.
template <int Rows>
void score_tile(const std::uint16_t* const* q, const std::uint16_t* packed, std::int64_t dp, float* s) {
  __m512 acc[Rows][vectors];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (std::int64_t pair = 0; pair < dp / 2; ++pair) {
    __m512bh k[vectors];
    for (int v = 0; v < vectors; ++v)
      k[v] = (__m512bh)_mm512_load_si512(packed + (pair * keys + v * 16) * 2);
    for (int r = 0; r < Rows; ++r) {
      const __m512bh qp = pair_broadcast(q[r] + 2 * pair);
      for (int v = 0; v < vectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], qp, k[v]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < vectors; ++v) _mm512_store_ps(s + r * keys + v * 16, acc[r][v]);
}

/// o_r += p_r · V for `Rows` rows over `n` keys: p (fp32 probabilities, [Rows][64]) is rounded to bf16.
template <int Rows>
void value_tile(const float* p, const std::uint16_t* packed, std::int64_t n, std::int64_t dp, float* const* o) {
  alignas(64) std::uint16_t p16[Rows][keys];
  for (int r = 0; r < Rows; ++r)
    for (int half = 0; half < keys; half += 32) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_load_ps(p + r * keys + half + 16), _mm512_load_ps(p + r * keys + half));
      _mm512_store_si512(p16[r] + half, (__m512i)pair);
    }
  const std::int64_t pairs = (n + 1) / 2;
  auto pass = [&](auto width, std::int64_t col) {
    constexpr int w = decltype(width)::value;
    __m512 acc[Rows][w];
    for (int r = 0; r < Rows; ++r)
      for (int v = 0; v < w; ++v) acc[r][v] = _mm512_load_ps(o[r] + col + v * 16);
    for (std::int64_t pair = 0; pair < pairs; ++pair) {
      __m512bh vv[w];
      for (int v = 0; v < w; ++v) vv[v] = (__m512bh)_mm512_load_si512(packed + (pair * dp + col + v * 16) * 2);
      for (int r = 0; r < Rows; ++r) {
        const __m512bh pp = pair_broadcast(p16[r] + 2 * pair);
        for (int v = 0; v < w; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pp, vv[v]);
      }
    }
    for (int r = 0; r < Rows; ++r)
      for (int v = 0; v < w; ++v) _mm512_store_ps(o[r] + col + v * 16, acc[r][v]);
  };
  std::int64_t col = 0;
  for (; col + vectors * 16 <= dp; col += vectors * 16) pass(std::integral_constant<int, vectors>{}, col);
  for (; col < dp; col += 16) pass(std::integral_constant<int, 1>{}, col);
}

}  // namespace bf16
#else
template <class T, class A>
inline constexpr bool bf16_dot = false;

/// Declared only: kernel.hpp calls these in branches discarded when bf16_dot is false.
namespace bf16 {
void pack_key(const bfloat16* key, std::int64_t t, std::int64_t d, std::uint16_t* packed);
void pack_value(const bfloat16* value, std::int64_t t, std::int64_t d, std::int64_t dp, std::uint16_t* packed);
template <int Rows>
void score_tile(const std::uint16_t* const* q, const std::uint16_t* packed, std::int64_t dp, float* s);
template <int Rows>
void value_tile(const float* p, const std::uint16_t* packed, std::int64_t n, std::int64_t dp, float* const* o);
}  // namespace bf16
#endif

}  // namespace moba::backends::cpu
