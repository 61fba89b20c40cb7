// SPDX-License-Identifier: MIT
/// @file Gating kernels: key-block means (fp32) and fused scores + top-k per query (SPEC §Blocks 2–5).
/// Scores live in registers only: no [queries × blocks] matrix is ever written.
#pragma once

#include <cstdint>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// kbar `[total_blocks, Hkv, D]` fp32: grid (total blocks, Hkv), 256 threads striding (dim, key).
template <class T>
__global__ void __launch_bounds__(256) block_means_kernel(core::fwd_params<T> p, const sequence_desc* table,
                                                           float* kbar) {
  __shared__ float partial[256];
  const std::int64_t gblock = blockIdx.x, kvh = blockIdx.y, d_len = p.head_dim;
  const std::int64_t s = find_sequence(table, p.seqs.count, gblock, [](const sequence_desc& e) { return e.block_offset; });
  const sequence_desc& e = table[s];
  const std::int64_t j = gblock - e.block_offset;
  const std::int64_t begin = core::block_begin(j, p.block_size), end = core::block_end(j, p.block_size, e.seq.k_len);
  const int stripes = 256 / static_cast<int>(d_len);
  const int d = threadIdx.x % d_len, stripe = threadIdx.x / d_len;
  float sum = 0;  // SPEC §Blocks 2: accumulate in fp32
  if (stripe < stripes)
    for (std::int64_t t = begin + stripe; t < end; t += stripes)
      sum += to_float(row_ptr(p.k, e.seq.batch, e.seq.k_start + t, kvh)[d]);
  partial[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x < d_len) {
    for (int x = 1; x < stripes; ++x) sum += partial[x * d_len + threadIdx.x];
    kbar[(gblock * p.kv_heads + kvh) * d_len + d] = sum / static_cast<float>(end - begin);
  }
}

/// Writes one query's selection (ascending, -1 padded) to the workspace `[rows, Hq, K]` and, when
/// given, to the caller's `selected` view.
template <class T>
__device__ void store_selection(const core::fwd_params<T>& p, const sequence_desc& e, std::int64_t i, std::int64_t h,
                                const std::int64_t* blocks, std::int64_t n, std::int32_t* sel, std::int64_t sel_width) {
  if (sel != nullptr) {
    std::int32_t* out = sel + ((e.row_offset + i) * p.q_heads + h) * sel_width;
    for (std::int64_t w = 0; w < sel_width; ++w) out[w] = w < n ? static_cast<std::int32_t>(blocks[w]) : -1;
  }
  if (p.selected.given())
    for (std::int64_t w = 0; w < p.selected.extent[3]; ++w)
      p.selected(e.seq.batch, e.seq.q_start + i, h, w) = w < n ? static_cast<std::int32_t>(blocks[w]) : -1;
}

/// Fused gate: grid (total gate tiles of gate_rows queries, Hq), gate_threads threads, dynamic shared memory
/// `(gate_rows + gate_tile_blocks) * (D + 1)` floats. Each query is owned by gate_split threads that
/// score interleaved blocks of each kbar tile in fp32 and keep their own top (K−1) (core::top_n, the
/// SPEC tie/NaN rule); the owners then merge their lists by shuffles.
template <class T>
__global__ void __launch_bounds__(gate_threads) gate_kernel(core::fwd_params<T> p, const sequence_desc* table,
                                                             const float* kbar, std::int32_t* sel) {
  extern __shared__ float4 gate_smem4[];
  float* gate_smem = reinterpret_cast<float*>(gate_smem4);
  // Rows padded to D + 4 floats: 16-byte loads, and the 8 query rows / 4 block rows a warp reads
  // at once fall in distinct banks.
  const std::int64_t d_len = p.head_dim, pitch = d_len + 4;
  float* q_s = gate_smem;                       // [gate_rows][D + 4]
  float* kb_s = gate_smem + gate_rows * pitch;  // [gate_tile_blocks][D + 4]
  const std::int64_t h = blockIdx.y, kvh = p.kv_head(h);
  const std::int64_t s = find_sequence(table, p.seqs.count, blockIdx.x, [](const sequence_desc& e) { return e.gate_offset; });
  const sequence_desc& e = table[s];
  const std::int64_t i0 = (blockIdx.x - e.gate_offset) * gate_rows;
  const std::int64_t rows = e.seq.q_len - i0 < gate_rows ? e.seq.q_len - i0 : gate_rows;

  for (std::int64_t x = threadIdx.x; x < gate_rows * d_len; x += gate_threads) {
    const std::int64_t r = x / d_len, d = x % d_len;
    q_s[r * pitch + d] = r < rows ? to_float(row_ptr(p.q, e.seq.batch, e.seq.q_start + i0 + r, h)[d]) : 0.f;
  }
  const int r = threadIdx.x / gate_split, sub = threadIdx.x % gate_split;
  const bool valid = r < rows;
  const std::int64_t i = i0 + r;
  const std::int64_t c = valid ? core::current_block(e.seq.pos(i), p.block_size) : 0;
  const std::int64_t want = valid ? core::history_count(c, p.top_k, false) : 0;
  const std::int64_t c_last = core::current_block(e.seq.pos(i0 + rows - 1), p.block_size);
  std::int64_t best_index[max_top_k];
  float best_score[max_top_k];
  core::top_n<float> top{best_index, best_score, want};
  // The worst kept score, in a register. Blocks are offered in increasing index, so a full list
  // rejects any score that is not strictly greater (SPEC §Blocks 5: ties go to the lower index);
  // a NaN worst is left to top_n's own rule.
  float worst = NAN;
  const float* kbar_seq = kbar + e.block_offset * p.kv_heads * d_len;

  for (std::int64_t j0 = 0; j0 < c_last; j0 += gate_tile_blocks) {
    __syncthreads();
    for (std::int64_t x = threadIdx.x; x < gate_tile_blocks * d_len; x += gate_threads) {
      const std::int64_t b = x / d_len, d = x % d_len;
      kb_s[b * pitch + d] = j0 + b < c_last ? kbar_seq[((j0 + b) * p.kv_heads + kvh) * d_len + d] : 0.f;
    }
    __syncthreads();
    constexpr int per_thread = gate_tile_blocks / gate_split;
    float acc[per_thread] = {};
    const float4* qr = reinterpret_cast<const float4*>(q_s + r * pitch);
    for (std::int64_t d4 = 0; d4 < d_len / 4; ++d4) {
      const float4 qv = qr[d4];
#pragma unroll
      for (int m = 0; m < per_thread; ++m) {
        const float4 kv = reinterpret_cast<const float4*>(kb_s + (sub + gate_split * m) * pitch)[d4];
        acc[m] = fmaf(qv.x, kv.x, acc[m]);
        acc[m] = fmaf(qv.y, kv.y, acc[m]);
        acc[m] = fmaf(qv.z, kv.z, acc[m]);
        acc[m] = fmaf(qv.w, kv.w, acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < per_thread; ++m) {
      const std::int64_t j = j0 + sub + gate_split * m;
      // SPEC §Blocks 4: only blocks wholly in the past are eligible.
      if (j < c && !(top.size == want && worst == worst && !(acc[m] > worst))) {
        top.offer(acc[m], j);
        if (top.size == want && want > 0) worst = best_score[want - 1];
      }
    }
  }

  // Merge the gate_split sorted lists of this query: `want` rounds of a shuffle argmax.
  const unsigned quad = ((1u << gate_split) - 1u) << (threadIdx.x % 32 & ~(gate_split - 1));
  std::int64_t chosen[max_top_k];
  std::int64_t head = 0;
  for (std::int64_t w = 0; w < want; ++w) {
    const bool have = head < top.size;
    float score = have ? best_score[head] : 0.f;
    int index = have ? static_cast<int>(best_index[head]) : -1;
    for (int off = 1; off < gate_split; off *= 2) {
      const float os = __shfl_xor_sync(quad, score, off);
      const int oi = __shfl_xor_sync(quad, index, off);
      if (oi >= 0 && (index < 0 || core::ranks_before(os, oi, score, index))) {
        score = os;
        index = oi;
      }
    }
    if (have && index == best_index[head]) ++head;
    chosen[w] = index;
  }
  if (valid && sub == 0) {
    chosen[want] = c;  // SPEC §Blocks 5: the current block is always one of the K
    core::sort_ascending(chosen, want + 1);
    store_selection(p, e, i, h, chosen, want + 1, sel, p.top_k);
  }
}

/// Full mode (every past block, SPEC §Attention): the selection output is 0..c(i), then -1.
template <class T>
__global__ void full_selection_kernel(core::fwd_params<T> p, const sequence_desc* table) {
  const std::int64_t h = blockIdx.y;
  const std::int64_t x = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t total = table[p.seqs.count].row_offset;
  if (x >= total) return;
  const std::int64_t s = find_sequence(table, p.seqs.count, x, [](const sequence_desc& e) { return e.row_offset; });
  const sequence_desc& e = table[s];
  const std::int64_t i = x - e.row_offset;
  const std::int64_t c = core::current_block(e.seq.pos(i), p.block_size);
  for (std::int64_t w = 0; w < p.selected.extent[3]; ++w)
    p.selected(e.seq.batch, e.seq.q_start + i, h, w) = w <= c ? static_cast<std::int32_t>(w) : -1;
}

}  // namespace moba::backends::cuda
