// SPDX-License-Identifier: MIT
/// @file The CUDA-core attention kernel (float): a warp per (query, head).
#pragma once

#include <cmath>
#include <cstdint>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/slots.cuh>
#include <moba/core/blocks.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {
/// CUDA-core path (float, and any dtype as a fallback): one warp per (query, head), lanes split the
/// head dim, fp32 online softmax over the selected blocks (`sel`, or every past block when null).
template <class T>
__global__ void __launch_bounds__(128) simt_kernel(core::fwd_params<T> p, const sequence_desc* table,
                                                   const std::int32_t* sel, float scale) {
  const std::int64_t x = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const std::int64_t total = table[p.seqs.count].row_offset * p.q_heads;
  if (x >= total) return;
  const std::int64_t row = x / p.q_heads, h = x % p.q_heads, kvh = p.kv_head(h), d_len = p.head_dim;
  const std::int64_t s = find_sequence(table, p.seqs.count, row, [](const sequence_desc& e) { return e.row_offset; });
  const sequence_desc& e = table[s];
  const sequence_info seq = e.seq;
  const std::int64_t i = row - e.row_offset, pos = seq.pos(i), c = core::current_block(pos, p.block_size);
  const T* q = row_ptr(p.q, seq.batch, seq.q_start + i, h);
  float qv[4], o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int u = 0; u < 4; ++u) qv[u] = lane + 32 * u < d_len ? to_float(q[lane + 32 * u]) : 0.f;
  float m = -INFINITY, l = 0.f;
  const std::int64_t n_sel = sel == nullptr ? c + 1 : p.top_k;
  for (std::int64_t w = 0; w < n_sel; ++w) {
    const std::int64_t j = sel == nullptr ? w : sel[selection_index(row, h, w, p.q_heads, p.top_k)];
    if (j < 0) continue;
    const core::key_range keys = core::attended_range(j, pos, p.block_size);
    for (std::int64_t key = keys.begin; key < keys.end; ++key) {
      const T* k = row_ptr(p.k, seq.batch, seq.k_start + key, kvh);
      const T* v = row_ptr(p.v, seq.batch, seq.k_start + key, kvh);
      float dot = 0.f;
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (lane + 32 * u < d_len) dot = fmaf(qv[u], to_float(k[lane + 32 * u]), dot);
      for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      const float score = dot * scale, m_new = fmaxf(m, score);
      const float alpha = expf(m - m_new), weight = expf(score - m_new);
      l = l * alpha + weight;
#pragma unroll
      for (int u = 0; u < 4; ++u)
        o[u] = o[u] * alpha + (lane + 32 * u < d_len ? weight * to_float(v[lane + 32 * u]) : 0.f);
      m = m_new;
    }
  }
  T* out = row_ptr(p.out, seq.batch, seq.q_start + i, h);
#pragma unroll
  for (int u = 0; u < 4; ++u)
    if (lane + 32 * u < d_len) out[lane + 32 * u] = from_float<T>(o[u] / l);
  if (lane == 0 && p.lse.given()) p.lse(seq.batch, seq.q_start + i, h) = m + logf(l);
}

}  // namespace moba::backends::cuda
