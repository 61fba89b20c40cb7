// SPDX-License-Identifier: MIT
/// @file The attention tile loop: 128 query rows × 128-key tiles by online softmax, with two
/// mainloops, wgmma (sm_90a: a warpgroup per 64 rows) and mma.sync (sm_80+: a warp per 16 rows),
/// chosen at compile time per architecture over one shared-memory layout and one register layout.
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

/// Issues the copy of the rows' queries into sm.q (the caller commits the cp.async group).
template <class T, int D>
__device__ void load_query_rows(attention_smem<T, D>& sm, const core::fwd_params<T>& p, const row_meta& m,
                                const sequence_desc& e) {
  const std::int64_t batch = e.seq.batch, q_start = e.seq.q_start;
  load_rows_async<T, D, tile_rows>(sm.q, [&](int r) -> const T* {
    return m.query[r] >= 0 ? row_ptr(p.q, batch, q_start + m.query[r], m.head[r]) : nullptr;
  });
}

/// Zeroes this thread's state.
template <int D>
__device__ __forceinline__ void init_state(row_state<D>& st) {
#pragma unroll
  for (int e = 0; e < D / 2; ++e) st.o[e] = 0.f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;
}

}  // namespace moba::backends::cuda
