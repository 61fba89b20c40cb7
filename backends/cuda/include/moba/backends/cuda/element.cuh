// SPDX-License-Identifier: MIT
/// @file Device loads and stores of the element types (bf16/f16 through their bits, float as is).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <moba/dtype.hpp>
#include <moba/tensor_view.hpp>

namespace moba::backends::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bfloat16 x) { return __uint_as_float(std::uint32_t{x.bits} << 16); }
__device__ __forceinline__ float to_float(float16 x) { return __half2float(__ushort_as_half(x.bits)); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bfloat16 from_float<bfloat16>(float x) {
  return bfloat16::from_bits(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
}
template <>
__device__ __forceinline__ float16 from_float<float16>(float x) {
  return float16::from_bits(__half_as_ushort(__float2half_rn(x)));
}

/// Two floats rounded to T and packed into one 32-bit register (lower index in the low half), as mma wants.
template <class T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ std::uint32_t pack2<bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}
template <>
__device__ __forceinline__ std::uint32_t pack2<float16>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

/// Address of row (b, t, h) of a [batch, seq, heads, dim] view; 64-bit offsets (SPEC §Bad input).
template <class T>
__device__ __forceinline__ T* row_ptr(const view4<T>& x, std::int64_t b, std::int64_t t, std::int64_t h) {
  return x.data + b * x.stride[0] + t * x.stride[1] + h * x.stride[2];
}

}  // namespace moba::backends::cuda
