// SPDX-License-Identifier: MIT
/// @file The attention epilogue: a tile's rows written to `out`, alone or merged with what earlier
/// passes left there (log2-sum-exp buffer, core::merge_lse2).
#pragma once

#include <cmath>
#include <cstdint>

#include <moba/backends/cuda/attention_tile.cuh>
#include <moba/core/online_softmax.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {
/// How a tile's result meets what earlier passes left in `out` and the log2-sum-exp buffer.
struct epilogue {
  float* lse2;      // [rows, Hq] log2-sum-exp of what `out` holds so far (row = row_offset + i)
  bool merge;       // combine with out / lse2 (rows that have earlier passes)
  bool final_pass;  // write the caller's lse (natural log) instead of lse2
};

/// Whether row r (rows: r < tile_rows) merges with an earlier pass's result; thread r copies and
/// writes its old row.
__device__ __forceinline__ bool merges_row(const row_meta& m, int r) {
  return r < tile_rows && m.query[r] >= 0 && m.merge[r];
}

/// Issues the copy of the `merging` rows' earlier output into sm.old_out (sm_90+: one bulk copy per
/// row, completing this item's phase of sm.old_bar, on which thread 0 arrives expecting their bytes;
/// else 16-byte cp.async) and of their log2-sum-exp into m.old_lse2, as one cp.async group.
template <class T, int D>
__device__ void load_old_rows(attention_smem<T, D>& sm, const core::fwd_params<T>& p, row_meta& m, const sequence_desc& e,
                              const epilogue& ep, int merging) {
  const std::int64_t batch = e.seq.batch, q_start = e.seq.q_start, row_offset = e.row_offset;
  const int r = threadIdx.x;
#if defined(MOBA_CUDA_BULK_COPY)
  if (r == 0) mbarrier_arrive_expect(&sm.old_bar, static_cast<std::uint32_t>(merging * D * sizeof(T)));
  if (merges_row(m, r))
    bulk_load(sm.old_out + r * old_pitch<D>, row_ptr(p.out, batch, q_start + m.query[r], m.head[r]), D * sizeof(T), &sm.old_bar);
#else
  (void)merging;
  constexpr int chunks = D / 8;
  for (int x = threadIdx.x; x < tile_rows * chunks; x += attention_threads) {
    const int row = x / chunks;
    if (merges_row(m, row))
      cp_async_16(sm.old_out + row * old_pitch<D> + x % chunks * 8,
                  row_ptr(p.out, batch, q_start + m.query[row], m.head[row]) + x % chunks * 8, true);
  }
#endif
  if (merges_row(m, r)) cp_async_4(&m.old_lse2[r], ep.lse2 + (row_offset + m.query[r]) * p.q_heads + m.head[r]);
  cp_async_commit();
}

/// Writes the tile's rows (m.query[r] >= 0) into out: alone, or where m.merge[r] says so merged
/// with the normalised partial result an earlier pass left (out_old · 2^(L_old − L) + o · 2^(m − L),
/// L the combined log2-sum-exp; load_old_rows copied out_old into sm.old_out and L_old). Each
/// thread merges its fragments in fp32 and rounds them once into sm.old_out; whole rows then go to
/// out as bulk copies (sm_90+: the CTA goes on while they drain; attention_kernel waits for them to
/// have read sm.old_out before it refills it) or in 16-byte chunks. The last cp.async group (the
/// next item's queries and first tiles, attend_tile's drain) need not be waited for.
template <class T, int D>
__device__ void finish_tile(attention_smem<T, D>& sm, const core::fwd_params<T>& p, const row_meta& m,
                            const sequence_desc& e, const row_state<D>& st, const epilogue& ep, int phase) {
  const int t = threadIdx.x % 4, r0 = threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
  const std::int64_t batch = e.seq.batch, q_start = e.seq.q_start, row_offset = e.row_offset;
  cp_async_wait<1>();  // the old rows, not the next item's queries and first tiles
#if defined(MOBA_CUDA_BULK_COPY)
  mbarrier_wait(&sm.old_bar, phase);
#else
  (void)phase;
#endif
  fence_async_shared();  // order the stages' last reads (wgmma: the async proxy) before later copies into them
  __syncthreads();       // every warp is done with the query tile; the old rows are visible
  for (int ri = 0; ri < 2; ++ri) {
    const int r = r0 + 8 * ri;
    const std::int64_t i = m.query[r], h = m.head[r];
    if (i < 0) continue;
    float part = st.m[ri] + log2f(st.l[ri]), w_old = 0.f, w_new = 1.f / st.l[ri];
    const bool merge = m.merge[r];
    if (merge) {
      const float old = m.old_lse2[r], total = core::merge_lse2(old, part);
      w_old = exp2f(old - total);
      w_new = exp2f(st.m[ri] - total);
      part = total;
    }
    T* row = sm.old_out + r * old_pitch<D>;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      auto* pair = reinterpret_cast<std::uint32_t*>(row + dn * 8 + 2 * t);
      float a = st.o[4 * dn + 2 * ri] * w_new, b = st.o[4 * dn + 2 * ri + 1] * w_new;
      if (merge) {
        const std::uint32_t bits = *pair;
        const T* prev = reinterpret_cast<const T*>(&bits);
        a += to_float(prev[0]) * w_old;
        b += to_float(prev[1]) * w_old;
      }
      *pair = pack2<T>(a, b);
    }
    if (t != 0) continue;
    if (!ep.final_pass) ep.lse2[(row_offset + i) * p.q_heads + h] = part;
    else if (p.lse.given()) p.lse(batch, q_start + i, h) = part * 0.6931471805599453f;
  }
  fence_async_shared();  // the rows' writes, before the bulk copies read them
  __syncthreads();
#if defined(MOBA_CUDA_BULK_COPY)
  const int r = threadIdx.x;
  if (r < tile_rows && m.query[r] >= 0) {
    bulk_store(row_ptr(p.out, batch, q_start + m.query[r], m.head[r]), sm.old_out + r * old_pitch<D>, D * sizeof(T));
    bulk_commit();
  }
#else
  constexpr int chunks = D / 8;
  for (int x = threadIdx.x; x < tile_rows * chunks; x += attention_threads) {
    const int r = x / chunks, c = x % chunks;
    if (m.query[r] >= 0)
      *reinterpret_cast<uint4*>(row_ptr(p.out, batch, q_start + m.query[r], m.head[r]) + c * 8) =
          *reinterpret_cast<const uint4*>(sm.old_out + r * old_pitch<D> + c * 8);
  }
#endif
}

}  // namespace moba::backends::cuda
