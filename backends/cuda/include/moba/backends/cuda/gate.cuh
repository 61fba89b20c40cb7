// SPDX-License-Identifier: MIT
/// @file The fused gate: scores of each query against the block means (block_means.cuh) and top-k
/// per query (SPEC §Blocks 3–5). Scores live in registers only: no [queries × blocks] matrix is ever written.
#pragma once

#include <cstdint>
#include <type_traits>

#include <moba/backends/cuda/block_means.cuh>
#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/mma_sm80.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/slots.cuh>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// Stages of kbar tiles: with three, the copy of tile s + 2 overlaps the products of tile s; two
/// (a copy waited for at the end of each step) where a third would cost the second CTA per SM.
template <class T>
inline constexpr int gate_kbar_stages = q_pieces<T> == 1 ? 3 : 2;
/// CTAs per SM the gate's shared memory allows, and so its register budget.
template <class T>
inline constexpr int gate_ctas_per_sm = q_pieces<T> <= 2 ? 2 : 1;

/// Writes entry w of one query's selection to the workspace (selection_index; w < K) and, when given,
/// to the caller's `selected` view (any width).
template <class T>
__device__ __forceinline__ void store_selection(const core::fwd_params<T>& p, const sequence_desc& e, std::int64_t i,
                                                std::int64_t h, std::int64_t w, std::int32_t block, std::int32_t* sel) {
  if (w < p.top_k) sel[selection_index(e.row_offset + i, h, w, p.q_heads, p.top_k)] = block;
  if (p.selected.given() && w < p.selected.extent[3]) p.selected(e.seq.batch, e.seq.q_start + i, h, w) = block;
}

/// Writes query i's selection (head h, current block c) from its `want` best keys (entry n at
/// best[n * tile_rows]) to the workspace and `selected`, and counts it into the slots. SPEC output
/// order is ascending: a history block's place is the number of smaller ones, and the current
/// block comes after them all (no local-memory sort).
template <class T>
__device__ __forceinline__ void write_selection(const core::fwd_params<T>& p, const sequence_desc& e, std::int64_t i,
                                                std::int64_t h, std::int64_t c, const std::uint64_t* best, int want,
                                                std::int32_t* sel, const slot_tally& tally) {
  auto block = [&](int n) { return core::key_block(best[n * tile_rows]); };
  const std::int64_t x = (e.row_offset + i) * p.q_heads + h, kvh = p.kv_head(h);
  for (int n = 0; n < want; ++n) {
    int place = 0;
    for (int m = 0; m < want; ++m) place += block(m) < block(n);
    store_selection(p, e, i, h, place, block(n), sel);
    if (tally.counts != nullptr)
      atomicAdd(&tally.counts[place * tally.counters + slot_counter(x, list_key(kvh, tally.total_blocks, e, block(n)))], 1);
  }
  const std::int64_t width = p.selected.given() && p.selected.extent[3] > p.top_k ? p.selected.extent[3] : p.top_k;
  for (std::int64_t w = want; w < width; ++w) store_selection(p, e, i, h, w, w == want ? static_cast<std::int32_t>(c) : -1, sel);
}

using core::key_block;
using core::key_score;
using core::ordered_floor;
using core::ordered_score;
using core::rank_key;

/// Sifts `key` down the 4-ary min-heap `heap` of `size` keys (entry n at heap[n * tile_rows]) from
/// entry n; returns the root afterwards (when n is 0). With four children per entry the 15 keys of
/// top_k = 16 lie within two levels of the root, so an insert waits for two rounds of shared-memory
/// reads (a binary heap: four).
__device__ __forceinline__ std::uint64_t sift_down(std::uint64_t* heap, int size, int n, std::uint64_t key) {
  std::uint64_t root = key;
  for (int first = 4 * n + 1; first < size; first = 4 * n + 1) {
    int child = first;
    std::uint64_t low = heap[first * tile_rows];
#pragma unroll
    for (int u = 1; u < 4; ++u)
      if (first + u < size) {
        const std::uint64_t x = heap[(first + u) * tile_rows];
        if (x < low) {
          low = x;
          child = first + u;
        }
      }
    if (key < low) break;  // keys are unique (the block is part of the key)
    if (n == 0) root = low;
    heap[n * tile_rows] = low;
    n = child;
  }
  heap[n * tile_rows] = key;
  return root;
}

/// Shared memory of the gate: the query tile's pieces, gate_kbar_stages<T> stages of kbar pieces for
/// gate_tile_blocks blocks (both stored like the attention tiles, swizzled_offset), two buffers of
/// scores (a padded row per query) and, past the struct, each row's best (K−1) keys.
template <class T, int D>
struct gate_smem {
  static constexpr int score_pitch = gate_tile_blocks + 4;  // 16-byte rows, a warp's 16-byte reads conflict-free
  alignas(1024) bfloat16 q[q_pieces<T>][tile_rows * D];
  alignas(1024) bfloat16 kbar[gate_kbar_stages<T>][kbar_pieces][gate_tile_blocks * D];
  alignas(16) float score[2][tile_rows * score_pitch];

  __device__ float* score_row(int buf, int r) { return score[buf] + r * score_pitch; }
  __device__ std::uint64_t* best() { return reinterpret_cast<std::uint64_t*>(this + 1); }  // [K − 1][tile_rows]
  static std::size_t launch_bytes(std::int64_t top_k) {
    return sizeof(gate_smem) + 1024 + static_cast<std::size_t>(top_k - 1) * tile_rows * sizeof(std::uint64_t);
  }
};

/// Most best keys a gate row keeps in registers (gate_kernel's List); every block of a tile runs
/// through the whole list, so top_k <= 3 (the paper's 3) gets a list of 2 and top_k <= 5 one of 4.
inline constexpr int gate_list_keys = 4;

/// Warp roles of the gate: warps 0–3 rank (a thread per query row), warps 4–7 score (32 rows per
/// warp) and copy kbar, so that the ranking of one tile of blocks overlaps the products of the next.
inline constexpr int gate_rankers = tile_rows, gate_scorers = attention_threads - tile_rows;
/// Fused gate: a CTA per (query tile of tile_rows, head), the heads of one tile adjacent (so that
/// concurrent CTAs count their rows into every head's slot counts, not all into one head's),
/// attention_threads threads, gate_smem. Scores q · kbar come from bf16 tensor-core products of
/// the pieces (split_bf16) with fp32 accumulation: fp32 scores, never written to global memory.
/// Per tile of blocks, the scorer warps write the scores to a shared-memory buffer; one ranker
/// thread per row keeps the row's best K−1 as rank_key values in a shared-memory min-heap whose
/// root, kept as a register bar, rejects most blocks; with List > 0 (K − 1 <= List) a sorted list in
/// registers takes every block of a tile without branches instead (no shared-memory round trip, no
/// warp divergence over candidates). Two score buffers let
/// the scorers compute one tile while the rankers rank the previous. With a tally, each row is also
/// counted in its slots as its selection is written (slots.cuh).
template <class T, int D, int List>
__global__ void __launch_bounds__(attention_threads, gate_ctas_per_sm<T>)
    gate_kernel(core::fwd_params<T> p, const sequence_desc* table, const bfloat16* kbar, const unsigned* ready,
                std::int32_t* sel, slot_tally tally) {
  extern __shared__ unsigned char gate_raw[];
  auto& sm = *reinterpret_cast<gate_smem<T, D>*>(align_1024(gate_raw));
  constexpr int qp = q_pieces<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4, mi = lane / 8, mr = lane % 8;
  const std::int64_t h = blockIdx.x % p.q_heads, kvh = p.kv_head(h), tile = blockIdx.x / p.q_heads;
  if (tile >= table[p.seqs.count].tile_offset) {  // the grid was sized by a bound (device offsets)
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) wait_for_prerequisite_grid();
    return;
  }
  const std::int64_t s = find_sequence(table, p.seqs.count, tile, [](const sequence_desc& e) { return e.tile_offset; });
  const sequence_desc e = table[s];  // a copy: stores to shared memory do not make it reload
  const std::int64_t i0 = (tile - e.tile_offset) * tile_rows;
  const std::int64_t rows = e.seq.q_len - i0 < tile_rows ? e.seq.q_len - i0 : tile_rows;
  const std::int64_t c_last = core::current_block(e.seq.pos(i0 + rows - 1), p.block_size);
  const int tiles = static_cast<int>((c_last + gate_tile_blocks - 1) / gate_tile_blocks);
  const bool scorer = threadIdx.x >= gate_rankers;
  auto load_kbar = [&](int tile) {  // by the scorers; blocks at or past c_last read as zeros
    if (tile >= tiles) {  // an empty group keeps the wait counts of the steps uniform
      cp_async_commit();
      return;
    }
    const std::int64_t j0 = tile * static_cast<std::int64_t>(gate_tile_blocks);
    const std::int64_t stride = p.kv_heads * kbar_pieces * D;
    const bfloat16* first = kbar + (e.block_offset + j0) * stride + kvh * kbar_pieces * D;
    const int valid = static_cast<int>(c_last - j0 < gate_tile_blocks ? c_last - j0 : gate_tile_blocks);
    for (int n = 0; n < kbar_pieces; ++n)
      load_tile_async<bfloat16, D, gate_tile_blocks, gate_scorers>(sm.kbar[tile % gate_kbar_stages<T>][n], first + n * D, stride, valid);
    cp_async_commit();
  };

  // bf16 queries are their own piece: copied straight into the tile, in flight while the CTA waits
  // for the block means it reads.
  constexpr int w = load_width<T>, q_loads = tile_rows * D / w / attention_threads;
  const T* q_first = row_ptr(p.q, e.seq.batch, e.seq.q_start + i0, h);
  if constexpr (qp == 1) {
    load_tile_async<bfloat16, D, tile_rows, attention_threads>(sm.q[0], q_first, p.q.stride[1], static_cast<int>(rows));
    cp_async_commit();
  }
  const unsigned* flags = ready + e.block_offset * p.kv_heads + kvh;
  for (std::int64_t j = threadIdx.x; j < c_last; j += attention_threads)
    while (load_acquire(flags + j * p.kv_heads) == 0) __nanosleep(128);
  __syncthreads();  // the means of every block this CTA reads are in place
  if (scorer)
    for (int tile = 0; tile < gate_kbar_stages<T> - 1; ++tile) load_kbar(tile);
  if constexpr (qp > 1) {
    // f16 and float queries are split into pieces. All of a thread's loads are issued before its first
    // shared-memory store, so that they are in flight together (stores the compiler could not tell
    // apart from them spaced them one DRAM round trip apart).
    load_unit<T> raw[q_loads];
#pragma unroll
    for (int it = 0; it < q_loads; ++it) {
      const int x = threadIdx.x + it * attention_threads, r = x / (D / w), d = x % (D / w) * w;
      raw[it] = r < rows ? *reinterpret_cast<const load_unit<T>*>(q_first + r * p.q.stride[1] + d) : load_unit<T>{};
    }
#pragma unroll
    for (int it = 0; it < q_loads; ++it) {
      const int x = threadIdx.x + it * attention_threads, r = x / (D / w), d = x % (D / w) * w;
      // w consecutive elements lie in one 16-byte chunk of the swizzled row
      auto at = [&](int n) { return reinterpret_cast<unsigned char*>(sm.q[n]) + swizzled_offset<tile_rows>(r, d); };
      float f[w];
      unpack_floats<T>(raw[it], f);
      alignas(16) bfloat16 piece[qp][w];
#pragma unroll
      for (int u = 0; u < w; ++u) {
        bfloat16 one[qp];
        split_bf16(f[u], one);
#pragma unroll
        for (int n = 0; n < qp; ++n) piece[n][u] = one[n];
      }
#pragma unroll
      for (int n = 0; n < qp; ++n) {
        if constexpr (w == 8) *reinterpret_cast<uint4*>(at(n)) = *reinterpret_cast<const uint4*>(piece[n]);
        else *reinterpret_cast<bfloat16*>(at(n)) = piece[n][0];
      }
    }
  }
  if (scorer) cp_async_wait<gate_kbar_stages<T> - 2>();  // the queries (bf16) and the first kbar stage
  else cp_async_wait<0>();
  __syncthreads();  // the query pieces and the first kbar stage are in place

  // The ranker's row and its best keys so far: appended until there are `want`, then a min-heap
  // whose root is the bar.
  const int row = threadIdx.x;
  const std::int64_t c = !scorer && row < rows ? core::current_block(e.seq.pos(i0 + row), p.block_size) : 0;
  std::uint64_t* best = sm.best() + row;  // entry n at best[n * tile_rows] (rankers only)
  const int want = static_cast<int>(core::history_count(c, p.top_k, false));
  int size = 0;
  std::uint64_t bar = 0;  // keys must exceed it (every key is > 0)
  // The register list: the best blocks' ordered_score + 1 (so that a NaN, 1, still beats an empty
  // entry, 0), ascending, so list[0] is the bar; entries past `want` hold the largest value, which no
  // insert moves, and the others start empty, so the list is full once list[0] != 0.
  std::uint32_t list[List > 0 ? List : 1];
  std::int32_t list_block[List > 0 ? List : 1];
#pragma unroll
  for (int n = 0; n < List; ++n) {
    list[n] = n < want ? 0u : ~0u;
    list_block[n] = 0;
  }

  const int row0 = (warp - gate_rankers / 32) * 32;  // a scorer warp's 32 rows, as two 16-row mma tiles
  auto score_tile = [&](int tile) {
    const int buf = tile % 2;
    float score[2][gate_tile_blocks / 2] = {};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      std::uint32_t a[qp][2][4];
#pragma unroll
      for (int n = 0; n < qp; ++n)
#pragma unroll
        for (int m = 0; m < 2; ++m)
          ldmatrix_x4<false>(a[n][m], reinterpret_cast<const unsigned char*>(sm.q[n]) +
                                          swizzled_offset<tile_rows>(row0 + m * 16 + (mi % 2) * 8 + mr, ks * 16 + (mi / 2) * 8));
#pragma unroll
      for (int nt = 0; nt < gate_tile_blocks / 8; nt += 2)
#pragma unroll
        for (int kn = 0; kn < kbar_pieces; ++kn) {
          std::uint32_t b[4];
          ldmatrix_x4<false>(b, reinterpret_cast<const unsigned char*>(sm.kbar[tile % gate_kbar_stages<T>][kn]) +
                                    swizzled_offset<gate_tile_blocks>((nt + mi / 2) * 8 + mr, ks * 16 + (mi % 2) * 8));
#pragma unroll
          for (int qn = 0; qn < qp && qn + kn <= 2; ++qn)
#pragma unroll
            for (int m = 0; m < 2; ++m) {
              mma_16816<bfloat16>(reinterpret_cast<float(&)[4]>(score[m][4 * nt]), a[qn][m], b[0], b[1]);
              mma_16816<bfloat16>(reinterpret_cast<float(&)[4]>(score[m][4 * nt + 4]), a[qn][m], b[2], b[3]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int nt = 0; nt < gate_tile_blocks / 8; ++nt)
#pragma unroll
        for (int x = 0; x < 4; x += 2)
          *reinterpret_cast<float2*>(sm.score_row(buf, row0 + m * 16 + lane / 4 + 4 * x) + nt * 8 + 2 * t) =
              make_float2(score[m][4 * nt + x], score[m][4 * nt + x + 1]);
  };
  // The register list ranks every eligible block of a tile without branches: a block enters when it
  // beats the lowest entry strictly (blocks come in ascending order, so of equal scores the earlier
  // stays ahead, SPEC §Blocks 5) and goes to its place. A warp skips a tile where no row of it has a
  // block that reaches its bar.
  auto rank_tile_in_list = [&](int tile) {
    const float* mine = sm.score_row(tile % 2, row);
    const std::int64_t j0 = tile * static_cast<std::int64_t>(gate_tile_blocks);
    const std::int64_t eligible = c - j0;  // SPEC §Blocks 4: only blocks wholly in the past
    float f[gate_tile_blocks];
#pragma unroll
    for (int col = 0; col < gate_tile_blocks; col += 4) *reinterpret_cast<float4*>(f + col) = *reinterpret_cast<const float4*>(mine + col);
    const float floor = ordered_floor(list[0] > 0 ? list[0] - 1 : 0);
    bool reach = false;
#pragma unroll
    for (int col = 0; col < gate_tile_blocks; ++col) reach |= col < eligible && (list[0] == 0 || f[col] >= floor);
    if (!__any_sync(~0u, reach)) return;
#pragma unroll
    for (int col = 0; col < gate_tile_blocks; ++col) {
      const std::uint32_t key = col < eligible ? ordered_score(f[col]) + 1 : 0u;
      const std::int32_t block = static_cast<std::int32_t>(j0 + col);
      // entry n takes entry n + 1 when the key beats that, else the key when it beats entry n
#pragma unroll
      for (int n = 0; n < List; ++n) {
        const bool above_next = n + 1 < List && key > list[n + 1];
        if (above_next) {
          list[n] = list[n + 1];
          list_block[n] = list_block[n + 1];
        } else if (key > list[n]) {
          list[n] = key;
          list_block[n] = block;
        }
      }
    }
  };
  auto rank_tile = [&](int tile) {
    const int buf = tile % 2;
    const std::int64_t j0 = tile * static_cast<std::int64_t>(gate_tile_blocks);
    if (want == 0) return;
    const float* mine = sm.score_row(buf, row);
    // The blocks whose score reaches the bar's. Once the heap is full only those are ranked, so a
    // warp's 32 rows diverge over a few candidates, not over every block. A NaN never passes: it
    // cannot beat a full heap (it ranks last, and later blocks lose ties).
    const auto reaching_bar = [&] {
      const float floor = key_score(bar);
      std::uint32_t reach = 0;
#pragma unroll
      for (int col = 0; col < gate_tile_blocks; col += 4) {
        const float4 four = *reinterpret_cast<const float4*>(mine + col);
        const float f[4] = {four.x, four.y, four.z, four.w};
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (f[u] >= floor) reach |= 1u << (col + u);
      }
      return reach;
    };
    // SPEC §Blocks 4: only blocks wholly in the past are eligible.
    const std::int64_t eligible = c - j0;
    constexpr std::uint32_t all = ~0u >> (32 - gate_tile_blocks);
    std::uint32_t maybe = eligible >= gate_tile_blocks ? all : eligible > 0 ? (1u << eligible) - 1 : 0u;
    if (bar != 0) maybe &= reaching_bar();  // the heap is full
    while (maybe != 0) {
      const int col = __ffs(maybe) - 1;
      maybe &= maybe - 1;
      const std::uint64_t key = rank_key(mine[col], j0 + col);
      if (key <= bar) continue;
      if (size < want) {
        best[size++ * tile_rows] = key;
        if (size < want) continue;
        for (int n = (want - 2) / 4; n >= 0; --n) bar = sift_down(best, want, n, best[n * tile_rows]);
        maybe &= reaching_bar();  // the heap just filled
      } else {
        bar = sift_down(best, want, 0, key);  // the new key replaces the lowest
      }
    }
  };
  // Step s: the scorers copy tile s + 2 into the stage tile s − 1 used and compute tile s into score
  // buffer s % 2 while the rankers rank tile s − 1 from the other; __syncthreads alone hands the
  // scores and the landed stage over and frees what the next step overwrites.
  for (int step = 0; step <= tiles; ++step) {
    if (scorer && step < tiles) {
      load_kbar(step + gate_kbar_stages<T> - 1);
      score_tile(step);
      cp_async_wait<gate_kbar_stages<T> - 2>();  // tile step + 1 has landed
    }
    if (!scorer && step > 0) {
      if constexpr (List > 0) rank_tile_in_list(step - 1);
      else rank_tile(step - 1);
    }
    __syncthreads();
  }

  if constexpr (List > 0)  // the list takes the heap's place, where the selection reads each key's block
#pragma unroll
    for (int n = 0; n < List; ++n)
      if (n < want) best[n * tile_rows] = rank_key(0.f, list_block[n]);
  if (!scorer && row < rows) write_selection(p, e, i0 + row, h, c, best, want, sel, tally);
  // The gate does not finish before the block means it overlaps (the means of a sequence's last block,
  // which no query reads, may still run), so the launches after it need not know about them.
  if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) wait_for_prerequisite_grid();
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
