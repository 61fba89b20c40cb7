// SPDX-License-Identifier: MIT
/// @file Attention kernels. One tile loop over 128 query rows × 128-key tiles with two mainloops:
/// wgmma (sm_90a: a warpgroup per 64 rows) and mma.sync (sm_80+: a warp per 16 rows), chosen at
/// compile time per architecture over one shared-memory layout and one register layout.
/// attention_kernel is persistent over work items: query tiles (causal_items: mode full, and the
/// current block of mode sparse) or the gathered rows that chose one key block in one selection slot
/// (history_items). Passes merge into `out` through a log-sum-exp buffer. A CUDA-core kernel serves float.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/mma_sm80.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/slots.cuh>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/backends/cuda/wgmma_sm90.cuh>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// The rows of one work item: up to tile_rows (query, head) pairs, row r attending keys [lo, hi).
struct row_meta {
  std::int64_t lo[tile_rows], hi[tile_rows];
  std::int32_t query[tile_rows];  // query index inside the sequence, -1 for an unused row
  std::int32_t head[tile_rows];   // its query head
  std::uint8_t merge[tile_rows];  // out and lse2 hold an earlier pass's result for the row
  float old_lse2[tile_rows];      // that result's log2-sum-exp (merging rows; copied ahead)
};

/// The keys and values of one kv head of a sequence: their first rows and row strides.
template <class T>
struct kv_rows {
  const T *k, *v;
  std::int64_t k_stride, v_stride;
};

/// One work item of an attention kernel: rows of one sequence (their row_meta) against its keys
/// [k_begin, k_end) of one kv head. `first` and `rows` place the rows in the item source's terms.
/// Kept in shared memory with a copy of the sequence's entry, which the epilogue then reads from there.
template <class T>
struct work_item {
  sequence_desc e;
  kv_rows<T> src;
  std::int64_t k_begin, k_end;
  std::int64_t first, rows;
};

/// Row pitch (elements) of the epilogue's rows in shared memory: 16-byte aligned rows whose 4-byte
/// pairs (row g of 8, column 2t) hit distinct banks.
template <int D>
inline constexpr int old_pitch = D + 8;

/// Shared memory of one attention CTA: the query tile and kv_stages stages of key and value tiles,
/// each stored 128B-swizzled ([D / 64][rows][64], swizzled_offset); a row buffer ([row][old_pitch]:
/// the merging rows' earlier output, copied in the last step, then the epilogue's merged rows);
/// and the rows and item of the current and the next work item.
template <class T, int D>
struct attention_smem {
  alignas(1024) T q[tile_rows * D];
  alignas(1024) T k[kv_stages][tile_keys * D];
  alignas(1024) T v[kv_stages][tile_keys * D];
  alignas(16) T old_out[tile_rows * old_pitch<D>];
  row_meta meta[2];
  work_item<T> item[2];
  std::int64_t claimed[2];  // the work item after item[slot]'s successor (attention_kernel)
  std::uint64_t old_bar;    // the old rows' bulk loads (sm_90+)
  /// Bytes to request: the struct plus slack to align the dynamic shared-memory base to 1024.
  static constexpr int launch_bytes = sizeof(attention_smem) + 1024;
  /// Aligned through the address as an integer, so row_meta and the epilogue's rows are reached with
  /// generic loads and stores: with align_1024's shared-space pointer the tile loop measured 1-3%
  /// slower (2026-11-26, H100; ptxas schedules it differently).
  __device__ static attention_smem& at(unsigned char* raw) {
    const std::uintptr_t a = (reinterpret_cast<std::uintptr_t>(raw) + 1023) & ~std::uintptr_t{1023};
    return *reinterpret_cast<attention_smem*>(a);
  }
};

/// Online-softmax state of the two rows (r, r + 8) a thread holds: unnormalised output in the mma
/// accumulator layout (o[4n + e]: column 8n + 2t + e % 2 of row e / 2), running max in log2 units
/// and running sum (of this thread's columns inside attend_tile, of the whole row once it returns).
template <int D>
struct row_state {
  float o[D / 2];
  float m[2];
  float l[2];
};

/// 2^x in one MUFU instruction (subnormal results flush to zero: weights that small do not count).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// S (this thread's share of the group's rows × tile_keys) = Q · K^T of stage `buf`. wgmma: issued
/// as one group, complete after wait_products.
template <class T, int D>
__device__ __forceinline__ void tile_scores(const attention_smem<T, D>& sm, int buf, float (&s)[tile_keys / 2]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#if defined(MOBA_CUDA_WGMMA)
  (void)lane;
  const auto* q = reinterpret_cast<const unsigned char*>(sm.q) + (warp / 4) * 64 * 128;
  const auto* k = reinterpret_cast<const unsigned char*>(sm.k[buf]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    wgmma<tile_keys, T>::ss(s, wgmma_desc(q + (ks / 4) * tile_rows * 128 + (ks % 4) * 32, 16, 1024),
                            wgmma_desc(k + (ks / 4) * tile_keys * 128 + (ks % 4) * 32, 16, 1024), ks > 0);
  wgmma_commit();
#else
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: this lane addresses row mr of matrix mi
  const auto* q = reinterpret_cast<const unsigned char*>(sm.q);
  const auto* k = reinterpret_cast<const unsigned char*>(sm.k[buf]);
#pragma unroll
  for (int e = 0; e < tile_keys / 2; ++e) s[e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    std::uint32_t a[4];
    ldmatrix_x4<false>(a, q + swizzled_offset<tile_rows>(warp * 16 + (mi % 2) * 8 + mr, ks * 16 + (mi / 2) * 8));
#pragma unroll
    for (int nt = 0; nt < tile_keys / 8; nt += 2) {
      std::uint32_t b[4];
      ldmatrix_x4<false>(b, k + swizzled_offset<tile_keys>((nt + mi / 2) * 8 + mr, ks * 16 + (mi % 2) * 8));
      mma_16816<T>(reinterpret_cast<float(&)[4]>(s[4 * nt]), a, b[0], b[1]);
      mma_16816<T>(reinterpret_cast<float(&)[4]>(s[4 * nt + 4]), a, b[2], b[3]);
    }
  }
#endif
}

/// O += P · V of stage `buf`; pa holds P as the A fragments of 16-key steps. wgmma: issued as one
/// group, complete after wait_products.
template <class T, int D>
__device__ __forceinline__ void tile_values(const attention_smem<T, D>& sm, int buf,
                                            const std::uint32_t (&pa)[tile_keys / 16][4], float (&o)[D / 2]) {
  const auto* v = reinterpret_cast<const unsigned char*>(sm.v[buf]);
#if defined(MOBA_CUDA_WGMMA)
  wgmma_fence();
#pragma unroll
  for (int kc = 0; kc < tile_keys / 16; ++kc)
    wgmma<D, T>::rs_mn(o, pa[kc], wgmma_desc(v + kc * 16 * 128, tile_keys * 128, 1024), 1);
  wgmma_commit();
#else
  const int lane = threadIdx.x % 32, mi = lane / 8, mr = lane % 8;
#pragma unroll
  for (int kc = 0; kc < tile_keys / 16; ++kc)
#pragma unroll
    for (int dn = 0; dn < D / 8; dn += 2) {
      std::uint32_t b[4];
      ldmatrix_x4<true>(b, v + swizzled_offset<tile_keys>(kc * 16 + (mi % 2) * 8 + mr, (dn + mi / 2) * 8));
      mma_16816<T>(reinterpret_cast<float(&)[4]>(o[4 * dn]), pa[kc], b[0], b[1]);
      mma_16816<T>(reinterpret_cast<float(&)[4]>(o[4 * dn + 4]), pa[kc], b[2], b[3]);
    }
#endif
}

/// Waits until at most `Pending` of the warpgroup's issued products still run (wgmma; mma.sync
/// products complete as they issue), then pins `acc` after the wait: its registers hold the results.
template <int Pending, int N>
__device__ __forceinline__ void wait_products(float (&acc)[N]) {
#if defined(MOBA_CUDA_WGMMA)
  wgmma_wait<Pending>();
#endif
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

/// Where kv head kvh's keys and values of a sequence start.
template <class T>
__device__ __forceinline__ kv_rows<T> kv_source(const core::fwd_params<T>& p, const sequence_info& seq, std::int64_t kvh) {
  return {row_ptr(p.k, seq.batch, seq.k_start, kvh), row_ptr(p.v, seq.batch, seq.k_start, kvh), p.k.stride[1], p.v.stride[1]};
}

#if defined(MOBA_CUDA_WGMMA)
/// The threads that issue the copies of key and value tiles: the second warpgroup, which waits for
/// the first's scores at every step anyway (the stagger), so that the first starts its products
/// right after the step's barrier. Same-run H100 A/B against every thread copying its share before
/// its products: 128K 15.0 -> 14.2-14.3 ms, mode full 32K 9.8 -> 9.2-9.4. (The queries too: no gain.)
inline constexpr int copy_threads = attention_threads / 2;
#else
inline constexpr int copy_threads = attention_threads;  // mma.sync: no stagger, every warp copies
#endif
__device__ __forceinline__ bool copies() { return static_cast<int>(threadIdx.x) >= attention_threads - copy_threads; }

/// Issues the copy of the tile of key (or value) rows from row k0 of `rows` into `stage`; rows at or
/// past k_end read as zeros. The caller commits the cp.async group.
template <class T, int D>
__device__ __forceinline__ void load_kv_tile(T* stage, const T* rows, std::int64_t stride, std::int64_t k0, std::int64_t k_end) {
  const int valid = static_cast<int>(k_end - k0 < tile_keys ? k_end - k0 : tile_keys);
  if (copies()) load_tile_async<T, D, tile_keys, copy_threads>(stage, rows + k0 * stride, stride, valid);
}

/// Issues the copies of work item `it`'s first key and value tiles into stage `buf` (the caller
/// commits the cp.async group).
template <class T, int D>
__device__ __forceinline__ void load_first_tiles(attention_smem<T, D>& sm, int buf, const work_item<T>& it) {
  load_kv_tile<T, D>(sm.k[buf], it.src.k, it.src.k_stride, it.k_begin, it.k_end);
  load_kv_tile<T, D>(sm.v[buf], it.src.v, it.src.v_stride, it.k_begin, it.k_end);
}

/// Attends the CTA's query tile (sm.q with the rows `m`) to keys [k_begin, k_end) of `src` (at least
/// one), each row to its own [lo, hi) only, by online softmax (SPEC §Attention). Every thread of the
/// CTA calls it, once the caller has committed the copies of the query tile and of the first key
/// and value tiles into stage `buf`.
///
/// Step n computes the scores of key tile n and, meanwhile, the product P·V of tile n − 1 (one
/// more step, the drain, does the last tile's), so that the softmax overlaps a running product
/// (FA3's intra-warpgroup pipelining). Tiles are double-buffered with the values one step behind
/// the keys: step n copies keys n + 1 and values n, into stages whose previous tiles steps before it
/// finished. Every thread calls `after_first_scores()` once the scores of tile 0 are issued (the
/// caller looks up `next`, the next work item, there, while tensor cores work). The drain copies
/// next's first keys and values, and calls `at_drain()` first, once every warp is done with the
/// query tile; the copies it leaves uncommitted join those tiles' cp.async group, the last one,
/// which this leaves uncompleted. Returns the stage of next's first tiles.
template <class T, int D, class AfterFirstScores, class AtDrain>
__device__ int attend_tile(attention_smem<T, D>& sm, const row_meta& m, const kv_rows<T>& src, std::int64_t k_begin,
                           std::int64_t k_end, float scale_log2, row_state<D>& st, int buf, const work_item<T>* next,
                           AfterFirstScores after_first_scores, AtDrain at_drain) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int r0 = warp * 16 + lane / 4;
  const std::int64_t lo[2] = {m.lo[r0], m.lo[r0 + 8]}, hi[2] = {m.hi[r0], m.hi[r0 + 8]};
  // Keys a tile must cover for this warp to skip the mask: [lo_max, hi_min) of its used rows.
  std::int64_t lo_max = INT64_MIN, hi_min = INT64_MAX;
  for (int ri = 0; ri < 2; ++ri)
    if (lo[ri] < hi[ri]) {
      lo_max = lo[ri] > lo_max ? lo[ri] : lo_max;
      hi_min = hi[ri] < hi_min ? hi[ri] : hi_min;
    }
  for (int off = 16; off > 0; off /= 2) {
    const std::int64_t a = __shfl_xor_sync(0xffffffffu, lo_max, off), b = __shfl_xor_sync(0xffffffffu, hi_min, off);
    lo_max = a > lo_max ? a : lo_max;
    hi_min = b < hi_min ? b : hi_min;
  }

  const std::int64_t tiles = (k_end - k_begin + tile_keys - 1) / tile_keys;
  // Step n (0..tiles; step `tiles` only drains): waits for its copies, then issues the next ones
  // into stages that steps before it finished.
  const auto begin_step = [&](std::int64_t n) {
    cp_async_wait<0>();
    fence_async_shared();
    __syncthreads();  // the copies are visible; every warp is done with the stages they refill below
    const std::int64_t k0 = k_begin + n * tile_keys;
    if (n < tiles) {
      if (n + 1 < tiles) load_kv_tile<T, D>(sm.k[buf ^ 1], src.k, src.k_stride, k0 + tile_keys, k_end);
      if (n > 0) load_kv_tile<T, D>(sm.v[buf], src.v, src.v_stride, k0, k_end);
    } else {
      at_drain();
      // Both stages are free: the last scores are done, the last values are in v[buf ^ 1].
      if (next != nullptr) load_first_tiles(sm, buf, *next);
    }
    cp_async_commit();
  };
#if defined(MOBA_CUDA_WGMMA)
  // Stagger the two warpgroups by one product: the second issues its products once the first's
  // scores are done, so tensor cores and the exp unit work at the same time. The first meets the
  // barrier after its scores, the second before its own; the second is already waiting there, so
  // a sync costs the first nothing (and compute-sanitizer racecheck misreads bar.arrive).
  const auto stagger = [&](bool scores_done) {
    if ((warp < 4) == scores_done) named_barrier_sync<1>(attention_threads);
  };
#else
  const auto stagger = [](bool) {};
#endif
  float s[tile_keys / 2];  // the scores of tile n, then its P (fp32)
  float alpha[2];          // how much the rows' running max rose at tile n
  // P = 2^(S·scale − running max) of the tile at k0, with the rows' max and sum brought up to date.
  const auto softmax = [&](std::int64_t k0) {
#pragma unroll
    for (int e = 0; e < tile_keys / 2; ++e) s[e] *= scale_log2;
    if (!(k0 >= lo_max && k0 + tile_keys <= hi_min)) {  // some row of the warp misses some key of the tile
      int lo_in[2], hi_in[2];  // the row's keys as columns of this tile
      for (int ri = 0; ri < 2; ++ri) {
        lo_in[ri] = static_cast<int>(lo[ri] - k0 < 0 ? 0 : lo[ri] - k0 > tile_keys ? tile_keys : lo[ri] - k0);
        hi_in[ri] = static_cast<int>(hi[ri] - k0 < 0 ? 0 : hi[ri] - k0 > tile_keys ? tile_keys : hi[ri] - k0);
      }
#pragma unroll
      for (int nt = 0; nt < tile_keys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * t + (e & 1);
          if (col < lo_in[e / 2] || col >= hi_in[e / 2]) s[4 * nt + e] = -INFINITY;
        }
    }
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < tile_keys / 2; ++e) row_max[(e / 2) % 2] = fmaxf(row_max[(e / 2) % 2], s[e]);
    float m_use[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      row_max[ri] = fmaxf(row_max[ri], __shfl_xor_sync(0xffffffffu, row_max[ri], 1));
      row_max[ri] = fmaxf(row_max[ri], __shfl_xor_sync(0xffffffffu, row_max[ri], 2));
      const float m_new = fmaxf(st.m[ri], row_max[ri]);
      m_use[ri] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing yet stays at weight 0, not NaN
      alpha[ri] = fast_exp2(st.m[ri] - m_use[ri]);
      st.m[ri] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < tile_keys / 2; ++e) {
      s[e] = fast_exp2(s[e] - m_use[(e / 2) % 2]);
      row_sum[(e / 2) % 2] += s[e];
    }
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) st.l[ri] = st.l[ri] * alpha[ri] + row_sum[ri];  // this thread's columns only
  };
  std::uint32_t pa[tile_keys / 16][4];  // P of the tile whose product with its values is next
  // Once o holds no running product: o to the new max, and P to the A fragments of P·V (the S
  // accumulator of key columns 16kc..16kc+15 is exactly the A fragment of key step kc).
  const auto rescale_and_pack = [&] {
#pragma unroll
    for (int e = 0; e < D / 2; ++e) st.o[e] *= alpha[(e / 2) % 2];
#pragma unroll
    for (int nt = 0; nt < tile_keys / 8; ++nt) {
      pa[nt / 2][(nt % 2) * 2 + 0] = pack2<T>(s[4 * nt + 0], s[4 * nt + 1]);
      pa[nt / 2][(nt % 2) * 2 + 1] = pack2<T>(s[4 * nt + 2], s[4 * nt + 3]);
    }
  };
  // Every product below is issued and waited for on every path: ptxas serialises wgmma around
  // branches. A warpgroup whose rows all miss a tile computes it anyway, masked.
  begin_step(0);
  stagger(false);
  tile_scores(sm, buf, s);
  after_first_scores();
  wait_products<0>(s);
  stagger(true);
  softmax(k_begin);
  rescale_and_pack();
  for (std::int64_t n = 1; n < tiles; ++n) {
    buf ^= 1;
    begin_step(n);
    stagger(false);
    tile_scores(sm, buf, s);
    tile_values(sm, buf ^ 1, pa, st.o);  // tile n − 1's
    wait_products<1>(s);
    stagger(true);
    softmax(k_begin + n * tile_keys);
    wait_products<0>(st.o);
    rescale_and_pack();
  }
  buf ^= 1;
  begin_step(tiles);
  stagger(false);  // no scores in the drain: each warpgroup meets the barrier once
  stagger(true);
  tile_values(sm, buf ^ 1, pa, st.o);
  wait_products<0>(st.o);
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {  // the row's sum over the 4 threads that share it
    st.l[ri] += __shfl_xor_sync(0xffffffffu, st.l[ri], 1);
    st.l[ri] += __shfl_xor_sync(0xffffffffu, st.l[ri], 2);
  }
  return buf;
}

/// How a tile's result meets what earlier passes left in `out` and the log2-sum-exp buffer.
struct epilogue {
  float* lse2;      // [rows, Hq] log2-sum-exp of what `out` holds so far (row = row_offset + i)
  bool merge;       // combine with out / lse2 (rows that have earlier passes)
  bool final_pass;  // write the caller's lse (natural log) instead of lse2
};

/// Issues the copy of the rows' queries into sm.q (the caller commits the cp.async group).
template <class T, int D>
__device__ void load_query_rows(attention_smem<T, D>& sm, const core::fwd_params<T>& p, const row_meta& m,
                                const sequence_desc& e) {
  const std::int64_t batch = e.seq.batch, q_start = e.seq.q_start;
  load_rows_async<T, D, tile_rows>(sm.q, [&](int r) -> const T* {
    return m.query[r] >= 0 ? row_ptr(p.q, batch, q_start + m.query[r], m.head[r]) : nullptr;
  });
}

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
      const float old = m.old_lse2[r], top = fmaxf(old, part);
      const float total = top + log2f(exp2f(old - top) + exp2f(part - top));
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

/// Zeroes this thread's state.
template <int D>
__device__ __forceinline__ void init_state(row_state<D>& st) {
#pragma unroll
  for (int e = 0; e < D / 2; ++e) st.o[e] = 0.f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;
}

/// Work items of query tiles (mode full, and the current block of mode sparse: the last pass,
/// merging the history passes): item n is tile `tiles - 1 - n % tiles` (late tiles first: in mode
/// full the longest) of query head n / tiles. Row i attends keys [lo, pos(i)] with lo = 0 (mode
/// full) or the start of its current block.
struct causal_items {
  template <class T>
  __device__ std::int64_t count(const core::fwd_params<T>& p, const sequence_desc* table) const {
    return table[p.seqs.count].tile_offset * p.q_heads;
  }
  template <class T>
  __device__ work_item<T> item(const core::fwd_params<T>& p, const sequence_desc* table, std::int64_t n) const {
    const std::int64_t tiles = table[p.seqs.count].tile_offset;  // query tiles of the call
    const std::int64_t h = n / tiles, tile = tiles - 1 - n % tiles;
    const sequence_desc e = table[find_sequence(table, p.seqs.count, tile, [](const sequence_desc& d) { return d.tile_offset; })];
    const std::int64_t i0 = (tile - e.tile_offset) * tile_rows;
    const std::int64_t rows = e.seq.q_len - i0 < tile_rows ? e.seq.q_len - i0 : tile_rows;
    // Keys [k_begin, k_end) cover every row's: the rows' positions ascend.
    const std::int64_t k_begin = p.full ? 0 : core::block_begin(core::current_block(e.seq.pos(i0), p.block_size), p.block_size);
    return {e, kv_source(p, e.seq, p.kv_head(h)), k_begin, e.seq.pos(i0 + rows - 1) + 1, i0, rows};
  }
  template <class T>
  __device__ void row(const core::fwd_params<T>& p, const sequence_desc* table, std::int64_t n, const work_item<T>& it,
                      bool merge_pass, int r, row_meta& m) const {
    const bool used = r < it.rows;
    const std::int64_t pos = used ? it.e.seq.pos(it.first + r) : 0, c = core::current_block(pos, p.block_size);
    m.query[r] = used ? static_cast<std::int32_t>(it.first + r) : -1;
    m.head[r] = static_cast<std::int32_t>(n / table[p.seqs.count].tile_offset);
    m.lo[r] = used && !p.full ? core::block_begin(c, p.block_size) : 0;
    m.hi[r] = used ? pos + 1 : 0;
    m.merge[r] = used && merge_pass && core::history_count(c, p.top_k, p.full) > 0;
  }
};

/// The rows (query, head) whose history block in one selection slot is key block j, listed per
/// key x = kvh · total_blocks + global block (slots.cuh) in tile_rows tiles: tile n, described by
/// tiles[n], is rows[tiles[n].first, + tiles[n].count), of tiles[n].span consecutive keys.
struct slot_lists {
  const std::int64_t* tile_count;  // the slot's tiles
  const list_tile* tiles;          // [tile_count]
  const std::int32_t* rows;        // entries i · Hq + h
  std::int64_t total_blocks;
  const std::int32_t* sel;         // the gate's selections (selection_index): a joined tile's rows find their block there
  std::int64_t slot;
};

/// Work items of one selection slot: item n is tile n of the slot's lists, attending its key block
/// (or, for a tile that joins several lists' last rows, their consecutive blocks, each row masked
/// to its own). Each row is in at most one tile of a slot, so its merge into out / lse2 needs no atomics.
struct history_items {
  slot_lists lists;
  template <class T>
  __device__ std::int64_t count(const core::fwd_params<T>&, const sequence_desc*) const { return *lists.tile_count; }
  template <class T>
  __device__ work_item<T> item(const core::fwd_params<T>& p, const sequence_desc* table, std::int64_t n) const {
    const list_tile tile = lists.tiles[n];
    const std::int64_t kvh = tile.key / lists.total_blocks, gblock = tile.key % lists.total_blocks;
    const sequence_desc e = table[find_sequence(table, p.seqs.count, gblock, [](const sequence_desc& d) { return d.block_offset; })];
    const std::int64_t j = gblock - e.block_offset;
    return {e, kv_source(p, e.seq, kvh), core::block_begin(j, p.block_size),
            core::block_end(j + tile.span - 1, p.block_size, e.seq.k_len), tile.first, tile.count};
  }
  template <class T>
  __device__ void row(const core::fwd_params<T>& p, const sequence_desc*, std::int64_t, const work_item<T>& it,
                      bool merge_pass, int r, row_meta& m) const {
    const std::int32_t entry = r < it.rows ? lists.rows[it.first + r] : -1;
    const std::int64_t i = entry / p.q_heads, h = entry % p.q_heads;
    std::int64_t lo = it.k_begin, hi = it.k_end;
    if (entry >= 0 && hi - lo > p.block_size) {  // a joined tile: the row's own block
      const std::int64_t j = lists.sel[selection_index(it.e.row_offset + i, h, lists.slot, p.q_heads, p.top_k)];
      lo = core::block_begin(j, p.block_size);
      hi = core::block_end(j, p.block_size, it.e.seq.k_len);
    }
    m.query[r] = entry < 0 ? -1 : static_cast<std::int32_t>(i);
    m.head[r] = entry < 0 ? 0 : static_cast<std::int32_t>(h);
    m.lo[r] = entry < 0 ? 0 : lo;
    m.hi[r] = entry < 0 ? 0 : hi;
    m.merge[r] = entry >= 0 && merge_pass;
  }
};

/// The last tile_rows threads (the second warpgroup): fill sm.meta[slot] with the rows of work item n
/// and (the first of them) sm.item[slot].
template <class T, int D, class Items>
__device__ void prepare_item(attention_smem<T, D>& sm, const core::fwd_params<T>& p, const sequence_desc* table,
                             const Items& items, bool merge_pass, std::int64_t n, int slot) {
  const int r = static_cast<int>(threadIdx.x) - (attention_threads - tile_rows);
  if (r < 0) return;
  const work_item<T> it = items.item(p, table, n);
  row_meta& m = sm.meta[slot];
  items.row(p, table, n, it, merge_pass, r, m);
  if (r == 0) sm.item[slot] = it;
}

/// A persistent attention kernel over the work items of `items` (causal_items or history_items):
/// CTA b runs item b, then items it claims in turn from `*ticket` (zero before the launch: items of
/// unequal length balance, longest first where the item order says so). As an item starts, the CTA
/// claims the item after the next; the second warpgroup looks up the next item while the first
/// scores run; the item's drain step copies the next item's first key and value tiles and, once the
/// item's query tile is free, the next queries and the item's own old rows (only its epilogue needs
/// them), so that a work item's setup overlaps the previous one's compute.
template <class T, int D, class Items>
__global__ void __launch_bounds__(attention_threads, 1)
    attention_kernel(core::fwd_params<T> p, const sequence_desc* table, Items items, epilogue ep, float scale_log2,
                     unsigned* ticket) {
  extern __shared__ unsigned char smem_raw[];
  auto& sm = attention_smem<T, D>::at(smem_raw);
  const std::int64_t count = items.count(p, table);
  const std::int64_t n = blockIdx.x;
  if (n >= count) return;
  if (threadIdx.x == 0) {
    sm.claimed[0] = gridDim.x + std::int64_t{atomicAdd(ticket, 1u)};
#if defined(MOBA_CUDA_BULK_COPY)
    mbarrier_init(&sm.old_bar);
#endif
  }
  prepare_item(sm, p, table, items, ep.merge, n, 0);
  __syncthreads();
  load_first_tiles(sm, 0, sm.item[0]);
  cp_async_commit();
  load_query_rows(sm, p, sm.meta[0], sm.item[0].e);
  cp_async_commit();
  for (int cur = 0, buf = 0, phase = 0;; cur ^= 1, phase ^= 1) {
    // Every thread is done with the previous item: its meta and item slot refill below.
    const int merging = __syncthreads_count(merges_row(sm.meta[cur], threadIdx.x));
    const std::int64_t next = sm.claimed[cur];
    const bool more = next < count;
    std::int64_t after_next = count;  // claimed now: the atomic's latency hides behind this item's tiles
    if (threadIdx.x == 0 && more) after_next = gridDim.x + std::int64_t{atomicAdd(ticket, 1u)};
    const kv_rows<T> src = sm.item[cur].src;
    const std::int64_t k_begin = sm.item[cur].k_begin, k_end = sm.item[cur].k_end;
    row_state<D> st;
    init_state(st);
    const auto look_up_next = [&] {
      if (more) prepare_item(sm, p, table, items, ep.merge, next, cur ^ 1);
    };
    buf = attend_tile(sm, sm.meta[cur], src, k_begin, k_end, scale_log2, st, buf, more ? &sm.item[cur ^ 1] : nullptr, look_up_next, [&] {
#if defined(MOBA_CUDA_BULK_COPY)
      bulk_wait_read();  // this thread's rows of the previous item have left sm.old_out
#endif
      load_old_rows(sm, p, sm.meta[cur], sm.item[cur].e, ep, merging);
      if (more) load_query_rows(sm, p, sm.meta[cur ^ 1], sm.item[cur ^ 1].e);
    });
    if (threadIdx.x == 0) sm.claimed[cur ^ 1] = after_next;
    finish_tile(sm, p, sm.meta[cur], sm.item[cur].e, st, ep, phase);
    if (!more) break;
  }
#if defined(MOBA_CUDA_BULK_COPY)
  bulk_wait();  // the last rows are in out before shared memory goes
#endif
}

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
    const std::int64_t end = core::block_end(j, p.block_size, pos + 1);
    for (std::int64_t key = core::block_begin(j, p.block_size); key < end; ++key) {
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
