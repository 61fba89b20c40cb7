// SPDX-License-Identifier: MIT
/// @file The sequence table built on the device from device offsets (flash-attention's cu_seqlens):
/// one small CTA before the call's kernels, so that a call with device offsets does no host work.
#pragma once

#include <cstdint>

#include <moba/backends/cuda/sequences.hpp>

namespace moba::backends::cuda {

inline constexpr int table_threads = 1024;

/// Inclusive scan of one value per thread of a table_threads CTA under `op` (associative), warp
/// shuffles then the warp totals in `warp_sums`; `total` gets the CTA's. Every thread must call it.
template <class V, class Op>
__device__ V block_scan(V v, V* warp_sums, Op op, V& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto warp_scan = [&](V& x) {
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const V y = shuffle_up(x, off);
      if (lane >= off) x = op(y, x);
    }
  };
  warp_scan(v);
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = warp_sums[lane];
    warp_scan(w);
    warp_sums[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v = op(warp_sums[warp - 1], v);
  total = warp_sums[table_threads / 32 - 1];
  __syncthreads();  // warp_sums is free for the next call
  return v;
}

struct span_ends {
  std::int64_t q, k;
};
__device__ __forceinline__ span_ends shuffle_up(const span_ends& x, int off) {
  return {__shfl_up_sync(~0u, x.q, off), __shfl_up_sync(~0u, x.k, off)};
}
__device__ __forceinline__ table_counts shuffle_up(const table_counts& x, int off) {
  return {__shfl_up_sync(~0u, x.blocks, off), __shfl_up_sync(~0u, x.tiles, off), __shfl_up_sync(~0u, x.rows, off)};
}

/// table[0, count] from `count + 1` device offsets each, which nothing has checked: every offset is
/// clamped into [0, total] and made non-decreasing (a running maximum), each length to its bound
/// (max_q, max_k) and q_len to k_len, so that whatever the offsets hold, every sequence lies inside
/// the tensors, no two overlap, and the totals stay within the bounds the launches were sized by.
/// One CTA of table_threads, in passes of table_threads sequences. (A template so that every
/// translation unit may define it: header-only.)
template <class Offset>
__global__ void __launch_bounds__(table_threads) table_kernel(const Offset* cu_q, const Offset* cu_k,
                                                               std::int64_t count, std::int64_t total_q, std::int64_t total_k,
                                                               std::int64_t max_q, std::int64_t max_k,
                                                               std::int64_t block_size, sequence_desc* table) {
  __shared__ span_ends end_sums[table_threads / 32];
  __shared__ table_counts count_sums[table_threads / 32];
  __shared__ span_ends ends[table_threads];
  const auto clamp = [](std::int64_t x, std::int64_t total) { return x < 0 ? 0 : x > total ? total : x; };
  const auto latest = [](span_ends a, span_ends b) { return span_ends{a.q > b.q ? a.q : b.q, a.k > b.k ? a.k : b.k}; };
  const auto add = [](table_counts a, table_counts b) {
    return table_counts{a.blocks + b.blocks, a.tiles + b.tiles, a.rows + b.rows};
  };
  span_ends before{clamp(cu_q[0], total_q), clamp(cu_k[0], total_k)};  // where the pass's first sequence starts
  table_counts done{0, 0, 0};  // the offsets of the pass's first sequence
  for (std::int64_t s0 = 0; s0 < count; s0 += table_threads) {
    const std::int64_t s = s0 + threadIdx.x;
    span_ends end = s < count ? span_ends{clamp(cu_q[s + 1], total_q), clamp(cu_k[s + 1], total_k)} : span_ends{0, 0};
    span_ends pass_end;
    end = latest(before, block_scan(end, end_sums, latest, pass_end));
    ends[threadIdx.x] = end;
    __syncthreads();
    const span_ends begin = threadIdx.x == 0 ? before : ends[threadIdx.x - 1];
    sequence_info seq{0, begin.q, begin.k, end.q - begin.q, end.k - begin.k};
    seq.k_len = seq.k_len < max_k ? seq.k_len : max_k;
    seq.q_len = seq.q_len < max_q ? seq.q_len : max_q;
    seq.q_len = seq.q_len < seq.k_len ? seq.q_len : seq.k_len;
    const table_counts mine = s < count ? counts_of(seq, block_size) : table_counts{0, 0, 0};
    table_counts pass_total;
    const table_counts upto = add(done, block_scan(mine, count_sums, add, pass_total));
    if (s < count) table[s] = {seq, upto.blocks - mine.blocks, upto.tiles - mine.tiles, upto.rows - mine.rows};
    before = latest(before, pass_end);
    done = add(done, pass_total);
    __syncthreads();  // `ends` is read before the next pass overwrites it
  }
  if (threadIdx.x == 0) table[count] = {sequence_info{}, done.blocks, done.tiles, done.rows};
}

}  // namespace moba::backends::cuda
