// SPDX-License-Identifier: MIT
/// @file The backward pass (SPEC §Backward) on CUDA cores, deterministic by construction: every
/// gradient element is summed by one thread in an order fixed by the inputs, with no atomics.
/// - delta_kernel: δ = rowsum(dout ∘ out) per (query, head), a warp each;
/// - dq_kernel: a warp per (query, head) walks the row's selected blocks key by key (dq += dS · K);
/// - dkdv_kernel: a CTA per 32 keys of one key block of one kv head gathers, in ascending order, the
///   rows (query × the kv head's query heads) that selected the block and sums dv += Pᵀ · dout and
///   dk += dSᵀ · Q in registers: GQA sums over the group without atomics or per-head copies.
/// P and dS are recomputed from the forward's lse in both kernels. The selection is the gate's
/// workspace format (given_selection.cuh): history blocks ascending, the current block, then -1;
/// null in mode full (every block up to the current one).
#pragma once

#include <cstdint>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/slots.cuh>
#include <moba/core/blocks.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

inline constexpr int backward_threads = 128;
inline constexpr int dkdv_keys = 32;  // keys per dkdv CTA: 8 per warp, 4 lanes per key
inline constexpr int dkdv_rows = 32;  // gathered rows held in shared memory at a time

/// Query row `row` (of the call's compact rows) of the table: its sequence's entry and index i.
__device__ __forceinline__ const sequence_desc& row_sequence(const sequence_desc* table, std::int64_t count, std::int64_t row) {
  return table[find_sequence(table, count, row, [](const sequence_desc& e) { return e.row_offset; })];
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(~0u, x, off);
  return x;
}

/// Whether query (row, h), whose current block is c, attends key block j.
__device__ __forceinline__ bool attends_block(const std::int32_t* sel, std::int64_t row, std::int64_t h, std::int64_t q_heads,
                                              std::int64_t top_k, std::int64_t c, std::int64_t j) {
  if (j > c) return false;
  if (sel == nullptr || j == c) return true;
  for (std::int64_t w = 0; w < top_k; ++w) {
    const std::int32_t e = sel[selection_index(row, h, w, q_heads, top_k)];
    if (e == j) return true;
    if (e < 0 || e > j) return false;  // entries ascend
  }
  return false;
}

/// δ[row · Hq + h] = Σ_d dout · out: a warp per (row, head).
template <class T>
__global__ void __launch_bounds__(backward_threads) delta_kernel(core::bwd_params<T> p, const sequence_desc* table, float* delta) {
  const std::int64_t x = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (x >= table[p.seqs.count].row_offset * p.q_heads) return;
  const std::int64_t row = x / p.q_heads, h = x % p.q_heads;
  const sequence_desc& e = row_sequence(table, p.seqs.count, row);
  const std::int64_t t = e.seq.q_start + row - e.row_offset;
  float sum = 0.f;
  for (std::int64_t d = threadIdx.x % 32; d < p.head_dim; d += 32)
    sum += to_float(p.dout(e.seq.batch, t, h, d)) * to_float(p.out(e.seq.batch, t, h, d));
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) delta[x] = sum;
}

/// dq of one (row, head) per warp: lane l holds dims l, l + 32, … (D / 32 of them).
template <class T, int D>
__global__ void __launch_bounds__(backward_threads)
    dq_kernel(core::bwd_params<T> p, const sequence_desc* table, const std::int32_t* sel, std::int64_t top_k,
              const float* delta, float scale) {
  constexpr int per_lane = D / 32;
  const int lane = threadIdx.x % 32;
  const std::int64_t x = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (x >= table[p.seqs.count].row_offset * p.q_heads) return;
  const std::int64_t row = x / p.q_heads, h = x % p.q_heads, kvh = p.kv_head(h);
  const sequence_desc& e = row_sequence(table, p.seqs.count, row);
  const std::int64_t i = row - e.row_offset, t = e.seq.q_start + i, pos = e.seq.pos(i);
  const std::int64_t c = core::current_block(pos, p.block_size);
  float q[per_lane], g[per_lane], dq[per_lane];
#pragma unroll
  for (int m = 0; m < per_lane; ++m) {
    q[m] = to_float(p.q(e.seq.batch, t, h, lane + 32 * m));
    g[m] = to_float(p.dout(e.seq.batch, t, h, lane + 32 * m));
    dq[m] = 0.f;
  }
  const float lse = static_cast<float>(p.lse(e.seq.batch, t, h)), dlt = delta[x];
  auto attend_block = [&](std::int64_t j) {
    const std::int64_t end = j == c ? pos + 1 : core::block_end(j, p.block_size, e.seq.k_len);
    for (std::int64_t key = core::block_begin(j, p.block_size); key < end; ++key) {
      const std::int64_t kt = e.seq.k_start + key;
      float k[per_lane], s = 0.f, dp = 0.f;
#pragma unroll
      for (int m = 0; m < per_lane; ++m) {
        k[m] = to_float(p.k(e.seq.batch, kt, kvh, lane + 32 * m));
        s += q[m] * k[m];
        dp += g[m] * to_float(p.v(e.seq.batch, kt, kvh, lane + 32 * m));
      }
      const float pr = expf(warp_sum(s) * scale - lse), ds = pr * (warp_sum(dp) - dlt);
#pragma unroll
      for (int m = 0; m < per_lane; ++m) dq[m] += ds * k[m];
    }
  };
  if (sel == nullptr) {
    for (std::int64_t j = 0; j <= c; ++j) attend_block(j);
  } else {
    for (std::int64_t w = 0; w < top_k; ++w) {
      const std::int32_t j = sel[selection_index(row, h, w, p.q_heads, top_k)];
      if (j < 0) break;
      attend_block(j);
    }
  }
#pragma unroll
  for (int m = 0; m < per_lane; ++m) p.dq(e.seq.batch, t, h, lane + 32 * m) = from_float<T>(dq[m] * scale);
}

/// dk and dv of keys [k0, k0 + 32) of key block j of one kv head. CTA x covers kv head
/// x / (blocks · tiles), block x / tiles % blocks (of the call's global blocks) and its 32-key tile
/// x % tiles, tiles = ⌈block_size / 32⌉. Lane l of warp w holds key 8w + l / 4 and dims
/// l % 4 + 4m (the four lanes of a key read four consecutive floats of a shared row).
template <class T, int D>
__global__ void __launch_bounds__(backward_threads)
    dkdv_kernel(core::bwd_params<T> p, const sequence_desc* table, const std::int32_t* sel, std::int64_t top_k,
                const float* delta, float scale, std::int64_t total_blocks) {
  constexpr int per_lane = D / 4;
  __shared__ float q_rows[dkdv_rows][D], g_rows[dkdv_rows][D];
  __shared__ float row_lse[dkdv_rows], row_delta[dkdv_rows];
  __shared__ std::int64_t row_pos[dkdv_rows];
  __shared__ std::int32_t gathered[backward_threads], warp_counts[backward_threads / 32];
  const std::int64_t tiles = (p.block_size + dkdv_keys - 1) / dkdv_keys;
  const std::int64_t kvh = blockIdx.x / (total_blocks * tiles), gblock = blockIdx.x / tiles % total_blocks;
  if (gblock >= table[p.seqs.count].block_offset) return;
  const sequence_desc& e = table[find_sequence(table, p.seqs.count, gblock, [](const sequence_desc& d) { return d.block_offset; })];
  const std::int64_t j = gblock - e.block_offset;
  const std::int64_t k0 = core::block_begin(j, p.block_size) + blockIdx.x % tiles * dkdv_keys;
  const std::int64_t k_end = core::block_end(j, p.block_size, e.seq.k_len);
  if (k0 >= k_end) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slice = lane % 4;
  const std::int64_t key = k0 + warp * 8 + lane / 4;  // this lane's key
  const bool key_used = key < k_end;
  float k[per_lane], v[per_lane], dk[per_lane], dv[per_lane];
#pragma unroll
  for (int m = 0; m < per_lane; ++m) {
    k[m] = key_used ? to_float(p.k(e.seq.batch, e.seq.k_start + key, kvh, slice + 4 * m)) : 0.f;
    v[m] = key_used ? to_float(p.v(e.seq.batch, e.seq.k_start + key, kvh, slice + 4 * m)) : 0.f;
    dk[m] = dv[m] = 0.f;
  }
  // Candidates: queries at or past k0 (the others see none of these keys), each with the group's heads.
  const std::int64_t group = p.q_heads / p.kv_heads, offset = e.seq.k_len - e.seq.q_len;
  const std::int64_t first = k0 - offset > 0 ? k0 - offset : 0;
  const std::int64_t candidates = (e.seq.q_len - first) * group;
  for (std::int64_t c0 = 0; c0 < candidates; c0 += backward_threads) {
    // Gather this round's rows in ascending order (ballots, then the warps' counts).
    const std::int64_t cand = c0 + threadIdx.x;
    bool chosen = false;
    if (cand < candidates) {
      const std::int64_t i = first + cand / group, h = kvh * group + cand % group;
      chosen = attends_block(sel, e.row_offset + i, h, p.q_heads, top_k, core::current_block(e.seq.pos(i), p.block_size), j);
    }
    const unsigned ballot = __ballot_sync(~0u, chosen);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < backward_threads / 32; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (chosen) gathered[before + __popc(ballot & ((1u << lane) - 1))] = static_cast<std::int32_t>(cand);
    __syncthreads();
    for (int r0 = 0; r0 < total; r0 += dkdv_rows) {
      const int rows = total - r0 < dkdv_rows ? total - r0 : dkdv_rows;
      for (int y = threadIdx.x; y < rows * D; y += backward_threads) {
        const std::int64_t cd = gathered[r0 + y / D], i = first + cd / group, h = kvh * group + cd % group;
        const std::int64_t t = e.seq.q_start + i;
        q_rows[y / D][y % D] = to_float(p.q(e.seq.batch, t, h, y % D));
        g_rows[y / D][y % D] = to_float(p.dout(e.seq.batch, t, h, y % D));
        if (y % D == 0) {
          row_lse[y / D] = static_cast<float>(p.lse(e.seq.batch, t, h));
          row_delta[y / D] = delta[(e.row_offset + i) * p.q_heads + h];
          row_pos[y / D] = e.seq.pos(i);
        }
      }
      __syncthreads();
      for (int r = 0; r < rows; ++r) {
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int m = 0; m < per_lane; ++m) {
          s += q_rows[r][slice + 4 * m] * k[m];
          dp += g_rows[r][slice + 4 * m] * v[m];
        }
        s += __shfl_xor_sync(~0u, s, 1);
        s += __shfl_xor_sync(~0u, s, 2);
        dp += __shfl_xor_sync(~0u, dp, 1);
        dp += __shfl_xor_sync(~0u, dp, 2);
        const bool seen = key_used && key <= row_pos[r];
        const float pr = seen ? expf(s * scale - row_lse[r]) : 0.f, ds = pr * (dp - row_delta[r]);
#pragma unroll
        for (int m = 0; m < per_lane; ++m) {
          dv[m] += pr * g_rows[r][slice + 4 * m];
          dk[m] += ds * q_rows[r][slice + 4 * m];
        }
      }
      __syncthreads();  // the rows are free for the next load
    }
  }
  if (!key_used) return;
#pragma unroll
  for (int m = 0; m < per_lane; ++m) {
    p.dk(e.seq.batch, e.seq.k_start + key, kvh, slice + 4 * m) = from_float<T>(dk[m] * scale);
    p.dv(e.seq.batch, e.seq.k_start + key, kvh, slice + 4 * m) = from_float<T>(dv[m]);
  }
}

}  // namespace moba::backends::cuda
