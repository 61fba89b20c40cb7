// SPDX-License-Identifier: MIT
/// @file Attention kernels. One tile loop over 128 query rows × 128-key tiles with two mainloops:
/// wgmma (sm_90a: a warpgroup per 64 rows) and mma.sync (sm_80+: a warp per 16 rows), chosen at
/// compile time per architecture over one shared-memory layout and one register layout.
/// causal_kernel runs query tiles (mode full, and the current block of mode sparse); history_kernel
/// runs the gathered rows that chose one key block in one selection slot. Passes merge into `out`
/// through a log-sum-exp buffer. A CUDA-core kernel serves float.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/mma_sm80.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/backends/cuda/wgmma_sm90.cuh>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// Shared memory of one attention CTA: the query tile and kv_stages stages of key and value tiles,
/// each stored 128B-swizzled ([D / 64][rows][64], swizzled_offset), plus the rows' metadata.
template <class T, int D>
struct attention_smem {
  alignas(1024) T q[tile_rows * D];
  alignas(1024) T k[kv_stages][tile_keys * D];
  alignas(1024) T v[kv_stages][tile_keys * D];
  std::int64_t lo[tile_rows], hi[tile_rows];  // keys [lo, hi) the row attends
  std::int32_t query[tile_rows];              // query index inside the sequence, -1 for an unused row
  std::int32_t head[tile_rows];               // its query head
  float old_weight[tile_rows];                // finish_tile: weight of out's earlier partial result, -1 for none
  std::int64_t warp_lo[attention_threads / 32], warp_hi[attention_threads / 32];  // per-warp key span
  /// Bytes to request: the struct plus slack to align the dynamic shared-memory base to 1024.
  static constexpr int launch_bytes = sizeof(attention_smem) + 1024;
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

/// S (this thread's share of the group's rows × tile_keys) = Q · K^T of stage `buf`.
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
  wgmma_wait<0>();
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

/// O += P · V of stage `buf`; pa holds P as the A fragments of 16-key steps.
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
  wgmma_wait<0>();
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

/// Where kv head kvh's keys and values of a sequence start (computed once: the sequence table
/// lives in global memory).
template <class T>
struct kv_rows {
  const T *k, *v;
  std::int64_t k_stride, v_stride;
  __device__ kv_rows(const core::fwd_params<T>& p, const sequence_info& seq, std::int64_t kvh)
      : k(row_ptr(p.k, seq.batch, seq.k_start, kvh)), v(row_ptr(p.v, seq.batch, seq.k_start, kvh)),
        k_stride(p.k.stride[1]), v_stride(p.v.stride[1]) {}
};

/// Issues the copy of the key and value tile starting at key k0 into stage `buf`, as one cp.async
/// group; keys at or past k_end read as zeros.
template <class T, int D>
__device__ __forceinline__ void load_kv_async(attention_smem<T, D>& sm, const kv_rows<T>& src, int buf, std::int64_t k0,
                                              std::int64_t k_end) {
  const int valid = static_cast<int>(k_end - k0 < tile_keys ? k_end - k0 : tile_keys);
  load_tile_async<T, D, tile_keys>(sm.k[buf], src.k + k0 * src.k_stride, src.k_stride, valid);
  load_tile_async<T, D, tile_keys>(sm.v[buf], src.v + k0 * src.v_stride, src.v_stride, valid);
  cp_async_commit();
}

/// Attends the CTA's query tile (sm.q, sm.lo, sm.hi, sm.warp_lo, sm.warp_hi: set, and the copies of
/// q and of the first key tile into stage 0 issued, by the caller: as early as it knows them, so
/// that they overlap its own setup) to keys [k_begin, k_end) of `src`, each row to its own [lo, hi)
/// only, by online softmax (SPEC §Attention). Every thread of the CTA calls it. Key tiles
/// are double-buffered: the copy of tile n + 1 runs while tile n is computed.
template <class T, int D>
__device__ void attend_tile(attention_smem<T, D>& sm, const kv_rows<T>& src, std::int64_t k_begin, std::int64_t k_end,
                            float scale_log2, row_state<D>& st) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int r0 = warp * 16 + lane / 4;
  const std::int64_t lo[2] = {sm.lo[r0], sm.lo[r0 + 8]}, hi[2] = {sm.hi[r0], sm.hi[r0 + 8]};
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
  // The span of keys the group issuing one matrix instruction needs (a warpgroup for wgmma).
#if defined(MOBA_CUDA_WGMMA)
  constexpr int group_warps = 4;
#else
  constexpr int group_warps = 1;
#endif
  std::int64_t span_lo = INT64_MAX, span_hi = INT64_MIN;
  for (int w = warp / group_warps * group_warps; w < (warp / group_warps + 1) * group_warps; ++w) {
    span_lo = sm.warp_lo[w] < span_lo ? sm.warp_lo[w] : span_lo;
    span_hi = sm.warp_hi[w] > span_hi ? sm.warp_hi[w] : span_hi;
  }

  int buf = 0;
  for (std::int64_t k0 = k_begin; k0 < k_end; k0 += tile_keys, buf ^= 1) {
    cp_async_wait<0>();
    fence_async_shared();
    __syncthreads();  // tile k0 is visible, and every warp is done with the previous tile's stage ...
    if (k0 + tile_keys < k_end) load_kv_async(sm, src, buf ^ 1, k0 + tile_keys, k_end);  // ... the next tile refills
    const bool active = k0 < span_hi && k0 + tile_keys > span_lo;  // uniform over the group
#if defined(MOBA_CUDA_WGMMA)
    // Stagger the two warpgroups by one product: the second computes its scores while the first
    // runs its softmax, so tensor cores and the exp unit work at the same time. The first meets the
    // barrier after its scores, the second before its own; the second is already waiting there, so
    // a sync costs the first nothing (and compute-sanitizer racecheck misreads bar.arrive).
    if (warp >= 4 || !active) named_barrier_sync<1>(attention_threads);
#endif
    if (active) {
      float s[tile_keys / 2];
      tile_scores(sm, buf, s);
#if defined(MOBA_CUDA_WGMMA)
      if (warp < 4) named_barrier_sync<1>(attention_threads);
#endif
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
      float alpha[2], m_use[2];
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
      std::uint32_t pa[tile_keys / 16][4];
#pragma unroll
      for (int nt = 0; nt < tile_keys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[4 * nt + e] = fast_exp2(s[4 * nt + e] - m_use[e / 2]);
          row_sum[e / 2] += s[4 * nt + e];
        }
        // The S accumulator of key columns 16kc..16kc+15 is exactly the A fragment of P·V.
        pa[nt / 2][(nt % 2) * 2 + 0] = pack2<T>(s[4 * nt + 0], s[4 * nt + 1]);
        pa[nt / 2][(nt % 2) * 2 + 1] = pack2<T>(s[4 * nt + 2], s[4 * nt + 3]);
      }
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) st.l[ri] = st.l[ri] * alpha[ri] + row_sum[ri];  // this thread's columns only
#pragma unroll
      for (int e = 0; e < D / 2; ++e) st.o[e] *= alpha[(e / 2) % 2];
      tile_values(sm, buf, pa, st.o);
    }
  }
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {  // the row's sum over the 4 threads that share it
    st.l[ri] += __shfl_xor_sync(0xffffffffu, st.l[ri], 1);
    st.l[ri] += __shfl_xor_sync(0xffffffffu, st.l[ri], 2);
  }
}

/// Fills sm.warp_lo / sm.warp_hi from sm.lo / sm.hi (used rows only) and waits for every thread.
template <class T, int D>
__device__ void tile_spans(attention_smem<T, D>& sm) {
  __syncthreads();
  if (threadIdx.x < tile_rows / 16) {
    std::int64_t a = INT64_MAX, b = INT64_MIN;
    for (int r = threadIdx.x * 16; r < threadIdx.x * 16 + 16; ++r)
      if (sm.lo[r] < sm.hi[r]) {
        a = sm.lo[r] < a ? sm.lo[r] : a;
        b = sm.hi[r] > b ? sm.hi[r] : b;
      }
    sm.warp_lo[threadIdx.x] = a;
    sm.warp_hi[threadIdx.x] = b;
  }
  __syncthreads();
}

/// How a tile's result meets what earlier passes left in `out` and the log2-sum-exp buffer.
struct epilogue {
  float* lse2;        // [rows, Hq] log2-sum-exp of what `out` holds so far (row = row_offset + i)
  bool merge;         // combine with out / lse2 (rows that have earlier passes)
  bool final_pass;    // write the caller's lse (natural log) instead of lse2
};

/// Writes the tile's rows (sm.query[r] >= 0, query head sm.head[r]) into out: alone, or merged with
/// the normalised partial result an earlier pass left (out_old · 2^(L_old − L) + o · 2^(m − L), L the
/// combined log2-sum-exp) where merges(query) says so. The rows go through shared memory (the key and
/// value stages, free once every warp is done with them) so that out is read and written in whole
/// 16-byte chunks, every old chunk of a thread loaded before any store.
template <class T, int D, class Merges>
__device__ void finish_tile(attention_smem<T, D>& sm, const core::fwd_params<T>& p, const sequence_desc& e,
                            const row_state<D>& st, const epilogue& ep, Merges merges) {
  constexpr int pitch = D + 8;  // floats: a half-warp's float2 stores of 4 rows hit distinct banks
  using smem = attention_smem<T, D>;
  static_assert(sizeof(sm.k) + sizeof(sm.v) >= tile_rows * pitch * sizeof(float) &&
                offsetof(smem, v) == offsetof(smem, k) + sizeof(sm.k));
  float* staged = reinterpret_cast<float*>(sm.k);
  const int t = threadIdx.x % 4, r0 = threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
  const std::int64_t batch = e.seq.batch, q_start = e.seq.q_start, row_offset = e.row_offset;  // once: e is global
  fence_async_shared();  // order the stages' last reads (wgmma: the async proxy) before the stores below
  __syncthreads();       // every warp is done with the key and value stages
  for (int ri = 0; ri < 2; ++ri) {
    const int r = r0 + 8 * ri;
    const std::int64_t i = sm.query[r], h = sm.head[r];
    if (i < 0) continue;
    float* lse2 = ep.lse2 ? ep.lse2 + (row_offset + i) * p.q_heads + h : nullptr;
    float part = st.m[ri] + log2f(st.l[ri]), w_old = -1.f, w_new = 1.f / st.l[ri];
    if (merges(i)) {
      const float old = *lse2, top = fmaxf(old, part);
      const float total = top + log2f(exp2f(old - top) + exp2f(part - top));
      w_old = exp2f(old - total);
      w_new = exp2f(st.m[ri] - total);
      part = total;
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<float2*>(staged + r * pitch + dn * 8 + 2 * t) =
          make_float2(st.o[4 * dn + 2 * ri] * w_new, st.o[4 * dn + 2 * ri + 1] * w_new);
    if (t != 0) continue;
    sm.old_weight[r] = w_old;
    if (!ep.final_pass) *lse2 = part;
    else if (p.lse.given()) p.lse(batch, q_start + i, h) = part * 0.6931471805599453f;
  }
  __syncthreads();
  constexpr int chunks = D / 8, per_thread = tile_rows * chunks / attention_threads;
  uint4 old[per_thread];
#pragma unroll
  for (int n = 0; n < per_thread; ++n) {
    const int x = threadIdx.x + n * attention_threads, r = x / chunks;
    if (sm.query[r] >= 0 && sm.old_weight[r] >= 0.f)
      old[n] = *reinterpret_cast<const uint4*>(row_ptr(p.out, batch, q_start + sm.query[r], sm.head[r]) + x % chunks * 8);
  }
#pragma unroll
  for (int n = 0; n < per_thread; ++n) {
    const int x = threadIdx.x + n * attention_threads, r = x / chunks, c = x % chunks;
    if (sm.query[r] < 0) continue;
    const float4 lo = *reinterpret_cast<const float4*>(staged + r * pitch + c * 8);
    const float4 hi = *reinterpret_cast<const float4*>(staged + r * pitch + c * 8 + 4);
    float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const float w_old = sm.old_weight[r];
    if (w_old >= 0.f) {
      const T* prev = reinterpret_cast<const T*>(&old[n]);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] += to_float(prev[k]) * w_old;
    }
    const uint4 packed{pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7])};
    *reinterpret_cast<uint4*>(row_ptr(p.out, batch, q_start + sm.query[r], sm.head[r]) + c * 8) = packed;
  }
}

/// Zeroes this thread's state.
template <int D>
__device__ __forceinline__ void init_state(row_state<D>& st) {
#pragma unroll
  for (int e = 0; e < D / 2; ++e) st.o[e] = 0.f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;
}

/// Query tiles: grid (total query tiles, Hq). Row i attends keys [lo, pos(i)] with lo = 0 (mode full)
/// or the start of its current block (mode sparse; the last pass, merging the history passes).
template <class T, int D>
__global__ void __launch_bounds__(attention_threads, 1)
    causal_kernel(core::fwd_params<T> p, const sequence_desc* table, epilogue ep, float scale_log2) {
  extern __shared__ unsigned char smem_raw[];
  auto& sm = attention_smem<T, D>::at(smem_raw);
  const std::int64_t h = blockIdx.y, kvh = p.kv_head(h);
  const std::int64_t s = find_sequence(table, p.seqs.count, blockIdx.x, [](const sequence_desc& e) { return e.tile_offset; });
  const sequence_desc& e = table[s];
  const std::int64_t i0 = (blockIdx.x - e.tile_offset) * tile_rows;
  const std::int64_t rows = e.seq.q_len - i0 < tile_rows ? e.seq.q_len - i0 : tile_rows;
  // Keys [k_begin, k_end) cover every row's: the rows' positions ascend.
  const std::int64_t k_begin = p.full ? 0 : core::block_begin(core::current_block(e.seq.pos(i0), p.block_size), p.block_size);
  const std::int64_t k_end = e.seq.pos(i0 + rows - 1) + 1;
  const kv_rows<T> src(p, e.seq, kvh);
  load_kv_async(sm, src, 0, k_begin, k_end);
  if (threadIdx.x < tile_rows) {
    const int r = threadIdx.x;
    const std::int64_t pos = r < rows ? e.seq.pos(i0 + r) : 0;
    sm.query[r] = r < rows ? static_cast<std::int32_t>(i0 + r) : -1;
    sm.head[r] = static_cast<std::int32_t>(h);
    sm.lo[r] = r >= rows ? 0 : p.full ? 0 : core::block_begin(core::current_block(pos, p.block_size), p.block_size);
    sm.hi[r] = r < rows ? pos + 1 : 0;
  }
  load_rows_async<T, D, tile_rows>(sm.q, [&](int r) -> const T* {
    return r < rows ? row_ptr(p.q, e.seq.batch, e.seq.q_start + i0 + r, h) : nullptr;
  });
  cp_async_commit();
  tile_spans(sm);
  row_state<D> st;
  init_state(st);
  attend_tile(sm, src, k_begin, k_end, scale_log2, st);
  finish_tile(sm, p, e, st, ep, [&](std::int64_t i) {
    return ep.merge && core::history_count(core::current_block(e.seq.pos(i), p.block_size), p.top_k, p.full) > 0;
  });
}

/// The rows (query, head) whose history block in one selection slot is key block j, listed per
/// key x = kvh · total_blocks + global block (slots.cuh): rows[start[x] .. start[x + 1]), in
/// tile_rows tiles numbered from tile_start[x]; tile_list[n] is the x of tile n.
struct slot_lists {
  const std::int64_t* start;       // [keys + 1]
  const std::int64_t* tile_start;  // [keys + 1]
  const std::int32_t* tile_list;   // [tiles]
  const std::int32_t* rows;        // entries i · Hq + h
  std::int64_t total_blocks;
};

/// One selection slot: grid (an upper bound on the slot's tiles); CTA x takes tile x. Each row is in
/// at most one tile of a slot, so its merge into out / lse2 needs no atomics.
template <class T, int D>
__global__ void __launch_bounds__(attention_threads, 1)
    history_kernel(core::fwd_params<T> p, const sequence_desc* table, slot_lists lists, epilogue ep, float scale_log2) {
  extern __shared__ unsigned char smem_raw[];
  auto& sm = attention_smem<T, D>::at(smem_raw);
  const std::int64_t keys = p.kv_heads * lists.total_blocks, tile = blockIdx.x;
  if (tile >= lists.tile_start[keys]) return;
  const std::int64_t x = lists.tile_list[tile];
  const std::int64_t kvh = x / lists.total_blocks, gblock = x % lists.total_blocks;
  const std::int64_t s = find_sequence(table, p.seqs.count, gblock, [](const sequence_desc& e) { return e.block_offset; });
  const sequence_desc& e = table[s];
  const std::int64_t j = gblock - e.block_offset;
  const std::int64_t k_begin = core::block_begin(j, p.block_size), k_end = core::block_end(j, p.block_size, e.seq.k_len);
  const kv_rows<T> src(p, e.seq, kvh);
  load_kv_async(sm, src, 0, k_begin, k_end);  // needs only the block: under the row lookup below
  const std::int64_t begin = lists.start[x] + (tile - lists.tile_start[x]) * tile_rows;
  const std::int64_t rows = lists.start[x + 1] - begin < tile_rows ? lists.start[x + 1] - begin : tile_rows;
  const std::int32_t* entries = lists.rows + begin;
  if (threadIdx.x < tile_rows) {
    const int r = threadIdx.x;
    const std::int32_t entry = r < rows ? entries[r] : -1;
    sm.query[r] = entry < 0 ? -1 : static_cast<std::int32_t>(entry / p.q_heads);
    sm.head[r] = entry < 0 ? 0 : static_cast<std::int32_t>(entry % p.q_heads);
    sm.lo[r] = entry < 0 ? 0 : k_begin;
    sm.hi[r] = entry < 0 ? 0 : k_end;
  }
  __syncthreads();
  load_rows_async<T, D, tile_rows>(sm.q, [&](int r) -> const T* {
    return sm.query[r] >= 0 ? row_ptr(p.q, e.seq.batch, e.seq.q_start + sm.query[r], sm.head[r]) : nullptr;
  });
  cp_async_commit();
  tile_spans(sm);
  row_state<D> st;
  init_state(st);
  attend_tile(sm, src, k_begin, k_end, scale_log2, st);
  finish_tile(sm, p, e, st, ep, [&](std::int64_t) { return ep.merge; });
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
    const std::int64_t j = sel == nullptr ? w : sel[(row * p.q_heads + h) * p.top_k + w];
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
