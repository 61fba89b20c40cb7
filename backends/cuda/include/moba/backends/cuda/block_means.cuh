// SPDX-License-Identifier: MIT
/// @file Key-block means for the gate (SPEC §Blocks 2): fp32 sums stored as bf16 pieces, each
/// (block, kv head) announcing itself by a flag so that the gate may start beside them (sm_90+).
#pragma once

#include <cstdint>
#include <type_traits>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/mma_sm80.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// A float as the sum of N bf16 pieces, largest first, each the rounding of what the earlier ones left:
/// three pieces carry a float's 24-bit significand, so products of pieces are exact on tensor cores.
/// A non-finite value keeps only its first piece.
template <int N>
__device__ __forceinline__ void split_bf16(float x, bfloat16 (&piece)[N]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    piece[n] = from_float<bfloat16>(x);
    x = isfinite(x) ? x - to_float(piece[n]) : 0.f;
  }
}

/// Pieces of the query (exact: bf16 needs one, fp16's 11-bit significand two, float three) and of
/// kbar (three). The gate multiplies the pairs whose piece numbers sum to at most 2: the dropped
/// terms are below 2^-24 of the score, fp32 rounding.
template <class T>
inline constexpr int q_pieces = std::is_same_v<T, bfloat16> ? 1 : std::is_same_v<T, float16> ? 2 : 3;
inline constexpr int kbar_pieces = 3;

/// Elements of T one load reads: 16 bytes for the 16-bit types (check() guarantees 16-byte rows), one float.
template <class T>
inline constexpr int load_width = sizeof(T) == 2 ? 8 : 1;

/// What one load reads: 16 bytes of a 16-bit type, or one float.
template <class T>
using load_unit = std::conditional_t<load_width<T> == 8, uint4, T>;

/// The load_width<T> elements of `raw` as floats.
template <class T>
__device__ __forceinline__ void unpack_floats(const load_unit<T>& raw, float (&f)[load_width<T>]) {
  if constexpr (load_width<T> == 8) {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int u = 0; u < 8; ++u) f[u] = to_float(e[u]);
  } else {
    f[0] = to_float(raw);
  }
}

/// The gate may start while the block means still run (programmatic dependent launch, sm_90+): each
/// (block, kv head) of means announces itself by a flag in `ready` (zeroed by the call's memset), and
/// the gate waits for the flags of exactly the blocks it reads. Without such a launch the flags are
/// all set before the gate starts.
__device__ __forceinline__ void allow_dependent_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
/// Waits until the grid this one overlaps has finished (and its writes are visible).
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
/// Reads a flag with acquire semantics: what was stored before it was set is visible after.
__device__ __forceinline__ unsigned load_acquire(const unsigned* flag) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
  return v;
}

/// kbar `[total_blocks, Hkv, kbar_pieces, D]` bf16 pieces of the fp32 block means, one unit per (block,
/// kv head), the heads of one block adjacent (together they read whole key rows), a unit's flag in
/// `ready` set once its pieces are stored. A CTA of means_threads takes units blockIdx.x, blockIdx.x +
/// gridDim.x, …, leaving room for two gate CTAs beside it. Each thread copies one column chunk
/// (load_width<T>) of every (means_threads / chunks)-th key of the unit into its own ring of shared
/// memory, means_depth copies in flight without holding registers, and sums them in fp32; a unit's
/// partial sums are added in shared memory while the next unit's first copies fly.
inline constexpr int means_threads = 128, means_depth = 16;
template <class T, int D>
__global__ void __launch_bounds__(means_threads, 16) block_means_kernel(core::fwd_params<T> p, const sequence_desc* table,
                                                                         bfloat16* kbar, unsigned* ready) {
  allow_dependent_launch();  // every CTA of this grid is running: the gate can take the room left
  constexpr int w = load_width<T>, chunks = D / w, rows_per_copy = means_threads / chunks;
  static_assert(means_threads >= D && means_threads % chunks == 0);
  __shared__ alignas(16) T ring[means_depth][means_threads][w];
  __shared__ float partial[means_threads][w];
  const int chunk = threadIdx.x % chunks, first_row = threadIdx.x / chunks;
  const std::int64_t units = table[p.seqs.count].block_offset * p.kv_heads;
  if (blockIdx.x >= units) return;  // the grid was sized by a bound (device offsets)
  struct unit_keys {
    const T* first;  // this thread's chunk of the unit's first key
    std::int64_t count, copies;
  };
  auto keys_of = [&](std::int64_t unit) {
    const std::int64_t gblock = unit / p.kv_heads, kvh = unit % p.kv_heads;
    const std::int64_t s = find_sequence(table, p.seqs.count, gblock, [](const sequence_desc& e) { return e.block_offset; });
    const sequence_desc& e = table[s];
    const std::int64_t j = gblock - e.block_offset, begin = core::block_begin(j, p.block_size);
    const std::int64_t count = core::block_end(j, p.block_size, e.seq.k_len) - begin;
    return unit_keys{row_ptr(p.k, e.seq.batch, e.seq.k_start + begin, kvh) + chunk * w, count,
                     (count + rows_per_copy - 1) / rows_per_copy};
  };
  // Copy m of a unit: key first_row + m * rows_per_copy (zeros past the block); always one group, so
  // that the wait counts stay uniform.
  auto copy = [&](const unit_keys& u, std::int64_t m) {
    if (m < u.copies) {
      const std::int64_t t = first_row + m * rows_per_copy;
      T* slot = ring[m % means_depth][threadIdx.x];
      const T* key = u.first + (t < u.count ? t : 0) * p.k.stride[1];
      if constexpr (w == 8) cp_async_16(slot, key, t < u.count);
      else if (t < u.count) cp_async_4(slot, key);  // float rows need only be 4-byte aligned
      else *slot = T{};
    }
    cp_async_commit();
  };
  unit_keys u = keys_of(blockIdx.x);  // the grid has at most `units` CTAs
  for (int m = 0; m < means_depth - 1; ++m) copy(u, m);
  for (std::int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    float sum[w] = {};  // SPEC §Blocks 2: accumulate in fp32
    for (std::int64_t m = 0; m < u.copies; ++m) {
      cp_async_wait<means_depth - 2>();
      asm volatile("" ::: "memory");  // the ring is read after the wait
      float f[w];
      if constexpr (w == 8) unpack_floats<T>(*reinterpret_cast<const uint4*>(ring[m % means_depth][threadIdx.x]), f);
      else
#pragma unroll
        for (int x = 0; x < w; ++x) f[x] = to_float(ring[m % means_depth][threadIdx.x][x]);
#pragma unroll
      for (int x = 0; x < w; ++x) sum[x] += f[x];
      copy(u, m + means_depth - 1);  // into the slot read one copy ago
    }
    const std::int64_t count = u.count;
#pragma unroll
    for (int x = 0; x < w; ++x) partial[threadIdx.x][x] = sum[x];
    __syncthreads();  // `partial` is complete; the copies still pending are empty groups
    if (unit + gridDim.x < units) {  // the next unit's first copies fly while this one is reduced
      u = keys_of(unit + gridDim.x);
      for (int m = 0; m < means_depth - 1; ++m) copy(u, m);
    }
    if (threadIdx.x < D) {
      const int d = threadIdx.x;
      float total = 0;
      for (int r = 0; r < rows_per_copy; ++r) total += partial[r * chunks + d / w][d % w];
      bfloat16 piece[kbar_pieces];
      split_bf16(total / static_cast<float>(count), piece);
      for (int n = 0; n < kbar_pieces; ++n) kbar[(unit * kbar_pieces + n) * D + d] = piece[n];
      __threadfence();  // the pieces are visible before the flag
    }
    __syncthreads();  // also frees `partial` for the next unit
    if (threadIdx.x == 0) *reinterpret_cast<volatile unsigned*>(ready + unit) = 1u;
  }
}

}  // namespace moba::backends::cuda
