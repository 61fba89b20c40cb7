// SPDX-License-Identifier: MIT
/// @file The sm_80+ tensor-core building blocks: mma.sync m16n8k16 (16-bit inputs, fp32 accumulate),
/// ldmatrix, cp.async, and the 128B-swizzled tile layout they share with the wgmma path.
#pragma once

#include <cstdint>

#include <moba/backends/cuda/tile_size.hpp>
#include <moba/dtype.hpp>

namespace moba::backends::cuda {

/// c += a·b for one warp. Fragment layout (PTX ISA, "mma.m16n8k16"): with g = lane / 4, t = lane % 4,
/// a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]}, b = {B[2t..][g], B[2t+8..][g]},
/// c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the launcher never runs this path below sm_80 (backend_impl::check)
#endif
}

/// Named barrier `Id` over `count` threads (bar.sync). A constant id lets ptxas reserve only the
/// barriers a kernel names.
template <int Id>
__device__ __forceinline__ void named_barrier_sync(int count) {
  asm volatile("bar.sync %0, %1;\n" ::"n"(Id), "r"(count) : "memory");
}

}  // namespace moba::backends::cuda

namespace moba::backends::cuda {

__device__ __forceinline__ std::uint32_t smem_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

/// The dynamic shared memory `raw` from its first 1024-byte boundary on. Offsetting `raw` itself
/// (not its address as an integer) keeps the pointer in the shared space, so that the compiler
/// reaches what lies there with shared-memory loads and stores, not generic ones.
__device__ __forceinline__ unsigned char* align_1024(unsigned char* raw) {
  return raw + (1024u - smem_address(raw) % 1024u) % 1024u;
}

/// Four 8×8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8, and receives
/// {M[g][2t..2t+1]} of each (".trans": {M[2t][g], M[2t+1][g]}), i.e. mma B fragments.
template <bool Transpose>
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Transpose)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
#endif
}

/// 16-byte asynchronous copy global -> shared; `valid == false` writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
/// 4-byte asynchronous copy global -> shared (through L1: .cg takes only 16 bytes).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_address(dst)), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

/// Byte offset of element (row, col) in a tile of `Rows` rows whose 16-bit rows are stored as column
/// chunks of 64 elements ([chunk][row][64]), each 128-byte row XOR-swizzled in 16-byte units by
/// row % 8: the "128B" swizzle wgmma descriptors describe; ldmatrix rows of 8 × 16 bytes then hit
/// distinct banks too. Tiles start 1024-byte aligned.
template <int Rows>
__device__ __forceinline__ std::uint32_t swizzled_offset(int row, int col) {
  return (col / 64) * (Rows * 128) + row * 128 + ((((col % 64) / 8) ^ (row % 8)) << 4) + (col % 8) * 2;
}

/// Copies 16-byte chunks of `rows` rows of D elements into a swizzled tile; `src(r)` is row r's
/// address or null (zeros).
template <class T, int D, int Rows, class Src>
__device__ __forceinline__ void load_rows_async(T* tile, Src src) {
  constexpr int chunks = D / 8;
  // threadIdx.x % attention_threads (= threadIdx.x) bounds x for the compiler: the loop unrolls.
  for (int x = threadIdx.x % attention_threads; x < Rows * chunks; x += attention_threads) {
    const int r = x / chunks, c = x % chunks;
    const T* row = src(r);
    cp_async_16(reinterpret_cast<unsigned char*>(tile) + swizzled_offset<Rows>(r, c * 8), row ? row + c * 8 : nullptr,
                row != nullptr);
  }
}

/// Copies rows first, first + stride, … of D elements into a swizzled tile of Rows rows; rows at or
/// past `valid` read as zeros. `Threads` consecutive threads share the copy. Each keeps one 16-byte
/// column and a fixed row residue mod 8, so its shared offsets are one base plus a constant step
/// (no per-chunk index arithmetic).
template <class T, int D, int Rows, int Threads = attention_threads>
__device__ __forceinline__ void load_tile_async(T* tile, const T* first, std::int64_t stride, int valid) {
  constexpr int chunks = D / 8, row_step = Threads / chunks;
  static_assert(Threads % chunks == 0 && row_step % 8 == 0 && Rows % row_step == 0);
  const int r0 = threadIdx.x % Threads / chunks, c = threadIdx.x % chunks;
  auto* dst = reinterpret_cast<unsigned char*>(tile) + swizzled_offset<Rows>(r0, c * 8);
  const T* src = first + r0 * stride + c * 8;
#pragma unroll
  for (int r = r0; r < Rows; r += row_step, dst += row_step * 128, src += row_step * stride)
    cp_async_16(dst, r < valid ? src : first, r < valid);
}

}  // namespace moba::backends::cuda
