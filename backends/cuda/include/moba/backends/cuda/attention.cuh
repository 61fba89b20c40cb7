// SPDX-License-Identifier: MIT
/// @file Attention kernels: the tensor-core tile loop (sm_80+ mma.sync, bf16/f16), the dense-causal
/// kernel (mode full), the gathered sparse kernel (mode sparse), and a CUDA-core path for float.
#pragma once

#include <cstdint>
#include <cmath>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/mma_sm80.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// Shared memory of one attention CTA: a query tile and two stages of key and value tiles, all
/// row-major (ldmatrix.trans reads V as the B operand); rows padded by smem_pad so that the eight
/// 16-byte rows of an ldmatrix phase hit distinct banks.
template <class T, int D>
struct attention_smem {
  T q[tile_rows][D + smem_pad];
  T k[2][tile_keys][D + smem_pad];
  T v[2][tile_keys][D + smem_pad];
  std::int64_t row[tile_rows];  // query index inside the sequence, -1 for an unused row
  std::int64_t pos[tile_rows];  // its key position pos(i) (causal limit), -1 for an unused row
};

/// Online-softmax state of the two rows (g, g + 8) a thread holds in each warp's 16-row slice:
/// unnormalised output (mma accumulator layout), running max in log2 units, running sum.
template <int D>
struct row_state {
  float o[D / 8][4];
  float m[2];
  float l[2];
};

template <int D>
__device__ __forceinline__ void init_state(row_state<D>& st) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) st.o[n][e] = 0.f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;
}

__device__ __forceinline__ std::uint32_t smem_word(const void* p) { return *static_cast<const std::uint32_t*>(p); }

/// Loads the query rows named by sm.row (of query head h) into sm.q, zero for unused rows.
template <class T, int D>
__device__ void load_queries(attention_smem<T, D>& sm, const core::fwd_params<T>& p, const sequence_info& seq,
                             std::int64_t h) {
  constexpr int chunks = D / 8;  // 16-byte vectors per row
  for (int x = threadIdx.x; x < tile_rows * chunks; x += attention_threads) {
    const int r = x / chunks, c = x % chunks;
    const std::int64_t i = sm.row[r];
    uint4 v = make_uint4(0, 0, 0, 0);
    if (i >= 0) v = *reinterpret_cast<const uint4*>(row_ptr(p.q, seq.batch, seq.q_start + i, h) + c * 8);
    *reinterpret_cast<uint4*>(&sm.q[r][c * 8]) = v;
  }
}

/// Starts the asynchronous copy of keys [k0, k0 + tile_keys) ∩ [k0, k_hi) of kv head kvh into stage
/// `buf`, zero beyond k_hi (a zero value row keeps masked columns from turning 0·garbage into NaN).
template <class T, int D>
__device__ void load_keys_async(attention_smem<T, D>& sm, int buf, const core::fwd_params<T>& p,
                                const sequence_info& seq, std::int64_t kvh, std::int64_t k0, std::int64_t k_hi) {
  constexpr int chunks = D / 8;
  for (int x = threadIdx.x; x < tile_keys * chunks; x += attention_threads) {
    const int r = x / chunks, c = x % chunks;
    const bool valid = k0 + r < k_hi;
    const std::int64_t key = seq.k_start + (valid ? k0 + r : 0);
    cp_async_16(&sm.k[buf][r][c * 8], row_ptr(p.k, seq.batch, key, kvh) + c * 8, valid);
    cp_async_16(&sm.v[buf][r][c * 8], row_ptr(p.v, seq.batch, key, kvh) + c * 8, valid);
  }
  cp_async_commit();
}

/// Attends the CTA's query tile (sm.q, sm.pos) to keys [k_lo, k_hi), each row to keys t <= pos(row)
/// only, updating `st` by online softmax (SPEC §Attention). Every thread of the CTA must call it.
/// Key tiles are double-buffered: the copy of tile n + 1 runs while tile n is computed.
template <class T, int D>
__device__ void attend_keys(attention_smem<T, D>& sm, const core::fwd_params<T>& p, const sequence_info& seq,
                            std::int64_t kvh, std::int64_t k_lo, std::int64_t k_hi, float scale_log2,
                            row_state<D>& st) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: this lane addresses row mr of matrix mi
  std::uint32_t qa[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    qa[ks][0] = smem_word(&sm.q[r0][ks * 16 + 2 * t]);
    qa[ks][1] = smem_word(&sm.q[r1][ks * 16 + 2 * t]);
    qa[ks][2] = smem_word(&sm.q[r0][ks * 16 + 8 + 2 * t]);
    qa[ks][3] = smem_word(&sm.q[r1][ks * 16 + 8 + 2 * t]);
  }
  const std::int64_t pos[2] = {sm.pos[r0], sm.pos[r1]};
  std::int64_t warp_max = pos[0] > pos[1] ? pos[0] : pos[1];
  for (int off = 16; off > 0; off /= 2) {
    const std::int64_t o = __shfl_xor_sync(0xffffffffu, warp_max, off);
    warp_max = o > warp_max ? o : warp_max;
  }

  __syncthreads();  // the previous user of the stages is done
  if (k_lo < k_hi) load_keys_async(sm, 0, p, seq, kvh, k_lo, k_hi);
  int buf = 0;
  for (std::int64_t k0 = k_lo; k0 < k_hi; k0 += tile_keys, buf ^= 1) {
    if (k0 + tile_keys < k_hi) load_keys_async(sm, buf ^ 1, p, seq, kvh, k0 + tile_keys, k_hi);
    else cp_async_commit();  // an empty group keeps the wait count uniform
    cp_async_wait<1>();
    __syncthreads();
    if (k0 <= warp_max) {  // warp-uniform: else every row of this warp is causally before the tile
      float s[tile_keys / 8][4];
#pragma unroll
      for (int nt = 0; nt < tile_keys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
        for (int nt = 0; nt < tile_keys / 8; nt += 2) {
          std::uint32_t b[4];
          ldmatrix_x4<false>(b, &sm.k[buf][(nt + mi / 2) * 8 + mr][ks * 16 + (mi % 2) * 8]);
          mma_16816<T>(s[nt], qa[ks], b[0], b[1]);
          mma_16816<T>(s[nt + 1], qa[ks], b[2], b[3]);
        }
      float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < tile_keys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const std::int64_t key = k0 + nt * 8 + 2 * t + (e & 1);
          const int ri = e / 2;
          s[nt][e] = key < k_hi && key <= pos[ri] ? s[nt][e] * scale_log2 : -INFINITY;
          row_max[ri] = fmaxf(row_max[ri], s[nt][e]);
        }
      float alpha[2], m_use[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        row_max[ri] = fmaxf(row_max[ri], __shfl_xor_sync(0xffffffffu, row_max[ri], 1));
        row_max[ri] = fmaxf(row_max[ri], __shfl_xor_sync(0xffffffffu, row_max[ri], 2));
        const float m_new = fmaxf(st.m[ri], row_max[ri]);
        m_use[ri] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing yet stays at weight 0, not NaN
        alpha[ri] = exp2f(st.m[ri] - m_use[ri]);
        st.m[ri] = m_new;
      }
      float row_sum[2] = {0.f, 0.f};
      std::uint32_t pa[tile_keys / 16][4];
#pragma unroll
      for (int nt = 0; nt < tile_keys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m_use[e / 2]);
          row_sum[e / 2] += s[nt][e];
        }
        // The S accumulator of key columns 16kc..16kc+15 is exactly the A fragment of P·V.
        pa[nt / 2][(nt % 2) * 2 + 0] = pack2<T>(s[nt][0], s[nt][1]);
        pa[nt / 2][(nt % 2) * 2 + 1] = pack2<T>(s[nt][2], s[nt][3]);
      }
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        row_sum[ri] += __shfl_xor_sync(0xffffffffu, row_sum[ri], 1);
        row_sum[ri] += __shfl_xor_sync(0xffffffffu, row_sum[ri], 2);
        st.l[ri] = st.l[ri] * alpha[ri] + row_sum[ri];
      }
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        st.o[dn][0] *= alpha[0];
        st.o[dn][1] *= alpha[0];
        st.o[dn][2] *= alpha[1];
        st.o[dn][3] *= alpha[1];
      }
#pragma unroll
      for (int kc = 0; kc < tile_keys / 16; ++kc)
#pragma unroll
        for (int dn = 0; dn < D / 8; dn += 2) {
          std::uint32_t b[4];
          ldmatrix_x4<true>(b, &sm.v[buf][kc * 16 + (mi % 2) * 8 + mr][(dn + mi / 2) * 8]);
          mma_16816<T>(st.o[dn], pa[kc], b[0], b[1]);
          mma_16816<T>(st.o[dn + 1], pa[kc], b[2], b[3]);
        }
    }
    __syncthreads();  // stage `buf` is refilled by the next iteration's copy
  }
  cp_async_wait<0>();
}

/// Writes the normalised output and lse of row `i` (state half `ri`) of query head h.
template <class T, int D>
__device__ void store_row(const core::fwd_params<T>& p, const sequence_info& seq, std::int64_t h, std::int64_t i,
                          const row_state<D>& st, int ri) {
  const int t = threadIdx.x % 4;
  const float inv = 1.f / st.l[ri];
  T* out = row_ptr(p.out, seq.batch, seq.q_start + i, h);
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    out[dn * 8 + 2 * t] = from_float<T>(st.o[dn][2 * ri] * inv);
    out[dn * 8 + 2 * t + 1] = from_float<T>(st.o[dn][2 * ri + 1] * inv);
  }
  if (t == 0 && p.lse.given())
    p.lse(seq.batch, seq.q_start + i, h) = (st.m[ri] + log2f(st.l[ri])) * 0.6931471805599453f;
}

/// Mode full (dense causal): grid (query tiles, Hq); each CTA runs its 64 rows over keys [0, last pos].
template <class T, int D>
__global__ void __launch_bounds__(attention_threads) dense_kernel(core::fwd_params<T> p, const sequence_desc* table,
                                                                   float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<attention_smem<T, D>*>(smem_raw);
  const std::int64_t h = blockIdx.y, kvh = p.kv_head(h);
  const std::int64_t s = find_sequence(table, p.seqs.count, blockIdx.x, [](const sequence_desc& e) { return e.tile_offset; });
  const sequence_info seq = table[s].seq;
  const std::int64_t i0 = (blockIdx.x - table[s].tile_offset) * tile_rows;
  const std::int64_t rows = seq.q_len - i0 < tile_rows ? seq.q_len - i0 : tile_rows;
  if (threadIdx.x < tile_rows) {
    const bool used = threadIdx.x < rows;
    sm.row[threadIdx.x] = used ? i0 + threadIdx.x : -1;
    sm.pos[threadIdx.x] = used ? seq.pos(i0 + threadIdx.x) : -1;
  }
  __syncthreads();
  load_queries(sm, p, seq, h);
  __syncthreads();
  row_state<D> st;
  init_state(st);
  attend_keys(sm, p, seq, kvh, 0, seq.pos(i0 + rows - 1) + 1, scale_log2, st);
  const int r0 = threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
  if (sm.row[r0] >= 0) store_row(p, seq, h, sm.row[r0], st, 0);
  if (sm.row[r0 + 8] >= 0) store_row(p, seq, h, sm.row[r0 + 8], st, 1);
}

/// Scratch of one CTA of the sparse kernel: the running state of range_rows queries and the
/// per-block lists of the queries that selected each block (a counting sort).
struct sparse_scratch {
  float* o;             // [range_rows, D]
  float* m;             // [range_rows], log2 units
  float* l;             // [range_rows]
  std::int32_t* begin;  // [max_blocks]: start of block j's list in `rows`
  std::int32_t* end;    // [max_blocks]
  std::int32_t* rows;   // [range_rows * K]

  static std::int64_t bytes(std::int64_t d, std::int64_t max_blocks, std::int64_t top_k) {
    const std::int64_t floats = range_rows * (d + 2), ints = 2 * max_blocks + range_rows * top_k;
    return ((4 * (floats + ints)) + 255) / 256 * 256;
  }
  __device__ static sparse_scratch at(unsigned char* base, std::int64_t d, std::int64_t max_blocks,
                                      std::int64_t top_k) {
    sparse_scratch s;
    s.o = reinterpret_cast<float*>(base);
    s.m = s.o + range_rows * d;
    s.l = s.m + range_rows;
    s.begin = reinterpret_cast<std::int32_t*>(s.l + range_rows);
    s.end = s.begin + max_blocks;
    s.rows = s.end + max_blocks;
    return s;
  }
};

/// Mode sparse, organised key-block-major inside each range of range_rows queries of one head:
/// the rows that selected block j are gathered into 64-row tiles and attended to block j's keys;
/// each row's running state lives in the CTA's scratch between its K blocks. A persistent grid
/// strides over (range, head) items; CTA b owns scratch slot b. See docs/design.md "CUDA backend".
template <class T, int D>
__global__ void __launch_bounds__(attention_threads)
    sparse_kernel(core::fwd_params<T> p, const sequence_desc* table, const std::int32_t* sel,
                  unsigned char* scratch_base, std::int64_t slot_bytes, std::int64_t max_blocks, float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ std::int32_t part[attention_threads];
  auto& sm = *reinterpret_cast<attention_smem<T, D>*>(smem_raw);
  const sparse_scratch sc = sparse_scratch::at(scratch_base + blockIdx.x * slot_bytes, D, max_blocks, p.top_k);
  const std::int64_t items = table[p.seqs.count].range_offset * p.q_heads, top_k = p.top_k;
  const int tid = threadIdx.x;

  for (std::int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const std::int64_t range = item / p.q_heads, h = item % p.q_heads, kvh = p.kv_head(h);
    const std::int64_t s = find_sequence(table, p.seqs.count, range, [](const sequence_desc& e) { return e.range_offset; });
    const sequence_desc& e = table[s];
    const sequence_info seq = e.seq;
    const std::int64_t i0 = (range - e.range_offset) * range_rows;
    const std::int64_t rows = seq.q_len - i0 < range_rows ? seq.q_len - i0 : range_rows;
    const std::int64_t blocks = core::current_block(seq.pos(i0 + rows - 1), p.block_size) + 1;
    const std::int32_t* my_sel = sel + ((e.row_offset + i0) * p.q_heads + h) * top_k;

    for (std::int64_t x = tid; x < rows * D; x += attention_threads) sc.o[x] = 0.f;
    for (std::int64_t x = tid; x < rows; x += attention_threads) {
      sc.m[x] = -INFINITY;
      sc.l[x] = 0.f;
    }
    for (std::int64_t j = tid; j < blocks; j += attention_threads) sc.begin[j] = 0;
    __syncthreads();
    for (std::int64_t x = tid; x < rows * top_k; x += attention_threads) {
      const std::int32_t j = my_sel[(x / top_k) * p.q_heads * top_k + x % top_k];
      if (j >= 0) atomicAdd(&sc.begin[j], 1);
    }
    __syncthreads();
    {  // exclusive scan of the counts: chunk per thread, then a serial scan of the chunk sums
      const std::int64_t chunk = (blocks + attention_threads - 1) / attention_threads;
      const std::int64_t b = tid * chunk, b_end = b + chunk < blocks ? b + chunk : blocks;
      std::int32_t sum = 0;
      for (std::int64_t j = b; j < b_end; ++j) sum += sc.begin[j];
      part[tid] = sum;
      __syncthreads();
      if (tid == 0) {
        std::int32_t run = 0;
        for (int x = 0; x < attention_threads; ++x) {
          const std::int32_t v = part[x];
          part[x] = run;
          run += v;
        }
      }
      __syncthreads();
      std::int32_t run = part[tid];
      for (std::int64_t j = b; j < b_end; ++j) {
        const std::int32_t v = sc.begin[j];
        sc.begin[j] = sc.end[j] = run;
        run += v;
      }
    }
    __syncthreads();
    for (std::int64_t x = tid; x < rows * top_k; x += attention_threads) {
      const std::int32_t j = my_sel[(x / top_k) * p.q_heads * top_k + x % top_k];
      if (j >= 0) sc.rows[atomicAdd(&sc.end[j], 1)] = static_cast<std::int32_t>(x / top_k);
    }
    __syncthreads();

    const int r0 = tid / 32 * 16 + tid % 32 / 4, t = tid % 4;
    for (std::int64_t j = 0; j < blocks; ++j) {
      const std::int32_t list_begin = sc.begin[j], list_end = sc.end[j];
      for (std::int32_t t0 = list_begin; t0 < list_end; t0 += tile_rows) {
        if (tid < tile_rows) {
          const std::int64_t li = t0 + tid < list_end ? sc.rows[t0 + tid] : -1;
          sm.row[tid] = li;
          sm.pos[tid] = li >= 0 ? seq.pos(i0 + li) : -1;
        }
        __syncthreads();
        // Rows are offsets inside the range: load_queries reads q at i0 + row.
        {
          constexpr int chunks = D / 8;
          for (int x = tid; x < tile_rows * chunks; x += attention_threads) {
            const int r = x / chunks, c = x % chunks;
            const std::int64_t li = sm.row[r];
            uint4 v = make_uint4(0, 0, 0, 0);
            if (li >= 0) v = *reinterpret_cast<const uint4*>(row_ptr(p.q, seq.batch, seq.q_start + i0 + li, h) + c * 8);
            *reinterpret_cast<uint4*>(&sm.q[r][c * 8]) = v;
          }
        }
        __syncthreads();
        row_state<D> st;
        init_state(st);
        const std::int64_t li[2] = {sm.row[r0], sm.row[r0 + 8]};
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          if (li[ri] < 0) continue;
          st.m[ri] = sc.m[li[ri]];
          st.l[ri] = sc.l[li[ri]];
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn) {
            const float2 v = *reinterpret_cast<const float2*>(&sc.o[li[ri] * D + dn * 8 + 2 * t]);
            st.o[dn][2 * ri] = v.x;
            st.o[dn][2 * ri + 1] = v.y;
          }
        }
        attend_keys(sm, p, seq, kvh, core::block_begin(j, p.block_size),
                    core::block_end(j, p.block_size, seq.k_len), scale_log2, st);
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          if (li[ri] < 0) continue;
          if (t == 0) {
            sc.m[li[ri]] = st.m[ri];
            sc.l[li[ri]] = st.l[ri];
          }
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn)
            *reinterpret_cast<float2*>(&sc.o[li[ri] * D + dn * 8 + 2 * t]) = make_float2(st.o[dn][2 * ri], st.o[dn][2 * ri + 1]);
        }
        __syncthreads();
      }
    }

    for (std::int64_t x = tid; x < rows * D; x += attention_threads) {
      const std::int64_t r = x / D, d = x % D;
      row_ptr(p.out, seq.batch, seq.q_start + i0 + r, h)[d] = from_float<T>(sc.o[x] / sc.l[r]);
    }
    if (p.lse.given())
      for (std::int64_t r = tid; r < rows; r += attention_threads)
        p.lse(seq.batch, seq.q_start + i0 + r, h) = (sc.m[r] + log2f(sc.l[r])) * 0.6931471805599453f;
    __syncthreads();
  }
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
