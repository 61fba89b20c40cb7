// SPDX-License-Identifier: MIT
/// @file Packing a chunk of rows (keys, values, or the backward's gathered queries) into the layouts of
/// the register tiles: transposed to [Dp, chunk] for the fp32 products, and the bf16 pair layouts of
/// dot_bf16.hpp. On AVX-512 the transposes run 16 × 16 blocks of 32-bit lanes in registers; elsewhere
/// they run element by element.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <moba/backends/cpu/dot_bf16.hpp>
#include <moba/backends/cpu/simd.hpp>
#include <moba/backends/cpu/tiling.hpp>
#include <moba/dtype.hpp>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moba::backends::cpu {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
namespace avx512 {
/// r[c] = column c of the 16 × 16 matrix of 32-bit lanes whose row i is r[i].
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // [a0 b0 a1 b1 | a4 b4 a5 b5 | ...] and [a2 b2 a3 b3 | ...]
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // four rows' column c in each 128-bit lane c, c + 4, c + 8, c + 12
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)  // eight rows' columns c, c + 8 (0x88) and c + 4, c + 12 (0xdd)
    for (int c = 0; c < 4; ++c) {
      t[h + c] = _mm512_shuffle_i32x4(r[h + c], r[h + c + 4], 0x88);
      t[h + c + 4] = _mm512_shuffle_i32x4(r[h + c], r[h + c + 4], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
  }
}

/// out[c · 64 + t] = lane c of load(t, c0) for c0 + c < columns, t < 64: `load(t, c0)` gives the 16
/// 32-bit lanes of row t from column c0 (zeros where the row has none).
template <class Load>
void transpose_chunk(Load&& load, std::int64_t columns, std::uint32_t* out) {
  for (int g = 0; g < 64; g += 16)
    for (std::int64_t c0 = 0; c0 < columns; c0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = load(g + i, c0);
      transpose16(r);
      const int n = static_cast<int>(std::min<std::int64_t>(16, columns - c0));
      for (int c = 0; c < n; ++c) _mm512_store_si512(out + (c0 + c) * 64 + g, r[c]);
    }
}

/// The mask of the first n lanes: none for n <= 0, all for n >= the vector's lanes.
inline __mmask32 first_lanes32(std::int64_t n) { return n >= 32 ? ~__mmask32{0} : (__mmask32{1} << std::max<std::int64_t>(n, 0)) - 1; }
inline __mmask16 first_lanes16(std::int64_t n) { return static_cast<__mmask16>(first_lanes32(std::min<std::int64_t>(n, 16))); }
}  // namespace avx512
#endif

/// out[x · chunk + t] = row(t)[x] widened to A for t < count, x < d; zeros for t in [count, chunk)
/// and x in [d, dp). chunk = register_tile<A>::chunk_keys.
template <class A, class T, class Row>
void pack_transposed(Row&& row, std::int64_t count, std::int64_t d, std::int64_t dp, A* out) {
  constexpr std::int64_t chunk = register_tile<A>::chunk_keys;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<A, float> && chunk == 64) {
    auto load = [&](std::int64_t t, std::int64_t c0) {
      if (t >= count) return _mm512_setzero_si512();
      const T* x = row(t) + c0;
      const __mmask16 m = avx512::first_lanes16(d - c0);
      if constexpr (std::is_same_v<T, float>) {
        return _mm512_maskz_loadu_epi32(m, x);
      } else if constexpr (std::is_same_v<T, bfloat16>) {
        return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x)), 16);
      } else {
        static_assert(std::is_same_v<T, float16>);
        return _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x)));
      }
    };
    avx512::transpose_chunk(load, dp, reinterpret_cast<std::uint32_t*>(out));
    return;
  }
#endif
  std::fill_n(out, dp * chunk, A(0));
  alignas(64) A widened[1024];  // one row at a time; rows longer than this go through in pieces
  for (std::int64_t t = 0; t < count; ++t)
    for (std::int64_t x0 = 0; x0 < d; x0 += 1024) {
      const std::int64_t n = std::min<std::int64_t>(1024, d - x0);
      widen_row<A>(row(t) + x0, widened, n, n);
      for (std::int64_t x = 0; x < n; ++x) out[(x0 + x) * chunk + t] = widened[x];
    }
}

namespace bf16 {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline __mmask32 tiny_lanes(__m512i x) {  // has_tiny on 32 lanes; zero lanes are not tiny
  const __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi16(0x7fff));
  return _mm512_cmplt_epu16_mask(_mm512_sub_epi16(magnitude, _mm512_set1_epi16(1)), _mm512_set1_epi16((27 << 7) - 1));
}

/// Rows [0, count) as [Dp/2][keys][2] (pack_key's layout), zeros past count and d; returns whether
/// a row holds a value too small for vdpbf16ps (has_tiny).
template <class Row>
bool pack_transposed(Row&& row, std::int64_t count, std::int64_t d, std::int64_t dp, std::uint16_t* packed) {
  __mmask32 tiny = 0;
  auto load = [&](std::int64_t t, std::int64_t pair0) {
    if (t >= count) return _mm512_setzero_si512();
    const __m512i x = _mm512_maskz_loadu_epi16(avx512::first_lanes32(d - 2 * pair0), row(t) + 2 * pair0);
    tiny |= tiny_lanes(x);
    return x;
  };
  avx512::transpose_chunk(load, dp / 2, reinterpret_cast<std::uint32_t*>(packed));
  return tiny != 0;
}

/// Rows [0, count) as [keys/2][Dp][2] (pack_value's layout) for the (count + 1) / 2 pairs of rows, an
/// odd count's partner zero, zeros past d; returns whether a row holds a value too small for vdpbf16ps.
template <class Row>
bool pack_paired(Row&& row, std::int64_t count, std::int64_t d, std::int64_t dp, std::uint16_t* packed) {
  alignas(64) static constexpr std::uint16_t low[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i interleave_low = _mm512_load_si512(low);
  const __m512i interleave_high = _mm512_add_epi16(interleave_low, _mm512_set1_epi16(16));
  __mmask32 tiny = 0;
  for (std::int64_t pair = 0; 2 * pair < count; ++pair) {
    const bfloat16* a = row(2 * pair);
    const bfloat16* b = 2 * pair + 1 < count ? row(2 * pair + 1) : nullptr;
    for (std::int64_t x0 = 0; x0 < dp; x0 += 32) {
      const __mmask32 m = avx512::first_lanes32(d - x0);
      const __m512i va = _mm512_maskz_loadu_epi16(m, a + x0);
      const __m512i vb = b ? _mm512_maskz_loadu_epi16(m, b + x0) : _mm512_setzero_si512();
      tiny |= tiny_lanes(va) | tiny_lanes(vb);
      std::uint16_t* out = packed + (pair * dp + x0) * 2;
      _mm512_store_si512(out, _mm512_permutex2var_epi16(va, interleave_low, vb));
      if (x0 + 16 < dp) _mm512_store_si512(out + 32, _mm512_permutex2var_epi16(va, interleave_high, vb));
    }
  }
  return tiny != 0;
}
#else
/// Declared only: kernel.hpp calls these in branches discarded when bf16_dot is false.
template <class Row>
bool pack_transposed(Row&& row, std::int64_t count, std::int64_t d, std::int64_t dp, std::uint16_t* packed);
template <class Row>
bool pack_paired(Row&& row, std::int64_t count, std::int64_t d, std::int64_t dp, std::uint16_t* packed);
#endif
}  // namespace bf16

}  // namespace moba::backends::cpu
