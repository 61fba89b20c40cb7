// SPDX-License-Identifier: MIT
/// @file Widening rows of any dtype to the compute type; the only intrinsics of the CPU backend.
#pragma once

#include <cstdint>
#include <type_traits>

#include <moba/dtype.hpp>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moba::backends::cpu {

/// Keeps a loaded vector in a register. Without it GCC folds the load into each FMA that uses it, so a
/// register tile of R rows loads every shared vector R times and becomes load-bound.
template <class Batch>
inline void keep_in_register(Batch& x) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(x.data));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(x.data));
#else
  (void)x;
#endif
}

/// Asks for the cache lines of [p, p + bytes) ahead of use. Key and value rows lie H·D elements apart
/// (a page apart at H·D·4 = 4 KiB), where the hardware prefetchers, which stay within a page, do not follow.
/// Volatile asm: GCC takes a function made only of __builtin_prefetch for one without effects and
/// deletes its calls.
inline void prefetch(const void* p, std::int64_t bytes) {
  for (std::int64_t b = 0; b < bytes; b += 64) {
    [[maybe_unused]] const char* line = static_cast<const char*>(p) + b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm volatile("prefetcht0 %0" : : "m"(*line));
#elif defined(__GNUC__) && defined(__aarch64__)
    asm volatile("prfm pldl1keep, %0" : : "Q"(*line));
#endif
  }
}

/// dst[0, n) = src[0, n) widened to A; dst[n, padded) = 0.
template <class A, class T>
void widen_row(const T* src, A* dst, std::int64_t n, std::int64_t padded) {
  std::int64_t i = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; i < n; ++i) dst[i] = src[i];
  } else if constexpr (std::is_same_v<T, bfloat16> && std::is_same_v<A, float>) {
    for (; i < n; ++i) dst[i] = detail::bits_float(std::uint32_t{src[i].bits} << 16);  // vectorises as a shift
  } else if constexpr (std::is_same_v<T, float16> && std::is_same_v<A, float>) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (; i < n; ++i) dst[i] = static_cast<A>(static_cast<double>(src[i]));
  }
  for (; i < padded; ++i) dst[i] = A(0);
}

/// dst[0, n) = src rounded to T (round to nearest even).
template <class T, class A>
void narrow_row(const A* src, T* dst, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace moba::backends::cpu
