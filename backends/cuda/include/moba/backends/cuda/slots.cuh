// SPDX-License-Identifier: MIT
/// @file Selection slots -> per-block row lists (a counting sort). Slot s of a query is its s-th
/// history block (ascending); a query appears at most once per slot, so the attention of one slot
/// can merge each row's result into `out` without atomics. The gate counts every slot's rows as it
/// selects them (slot_tally), and one launch scans the counts of all slots (small: slots × kv heads
/// × blocks × count_shards); the row lists, as large as the queries, are built one slot at a time.
#pragma once

#include <cstdint>

#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// Each key's count is split over count_shards words, entry x = row · Hq + h counting in shard
/// (x / 256) % count_shards: concurrent CTAs then add to different words (with one word per key,
/// at 64 blocks per head, the atomics queued behind each other). A key's shards are adjacent.
inline constexpr int count_shards = 8;
__device__ __forceinline__ std::int64_t slot_counter(std::int64_t x, std::int64_t key) {
  return key * count_shards + x / 256 % count_shards;
}

/// The list key of block j of sequence e for kv head kvh: kvh · total_blocks + the block's global index.
__device__ __forceinline__ std::int64_t list_key(std::int64_t kvh, std::int64_t total_blocks, const sequence_desc& e,
                                                 std::int64_t j) {
  return kvh * total_blocks + e.block_offset + j;
}

/// Where the gate counts, as it writes each row's selection, the rows of every slot per key:
/// counts[slot · counters + slot_counter(x, list_key(...))]. Null counts: nothing is counted (mode full, or no history slots).
struct slot_tally {
  std::int32_t* counts;
  std::int64_t counters;  // per slot: kv heads × total_blocks × count_shards
  std::int64_t total_blocks;
};

/// One tile of a slot's row lists: rows[first, first + count) of the list of key `key`.
struct list_tile {
  std::int64_t first;
  std::int32_t key;
  std::int32_t count;
};

inline constexpr int scan_threads = 1024;
struct rows_tiles {
  std::int64_t rows, tiles;
};

/// Inclusive sums of (rows, tiles) over the threads of a scan_threads CTA (warp shuffles, then the
/// warp totals in `warp_sums`); `total` gets the CTA's sums. Every thread must call it.
__device__ __forceinline__ rows_tiles scan_rows_tiles(rows_tiles v, rows_tiles* warp_sums, rows_tiles& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto warp_scan = [&](rows_tiles& x) {
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const std::int64_t r = __shfl_up_sync(~0u, x.rows, off), t = __shfl_up_sync(~0u, x.tiles, off);
      if (lane >= off) x.rows += r, x.tiles += t;
    }
  };
  warp_scan(v);
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    rows_tiles w = warp_sums[lane];
    warp_scan(w);
    warp_sums[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v.rows += warp_sums[warp - 1].rows, v.tiles += warp_sums[warp - 1].tiles;
  total = warp_sums[scan_threads / 32 - 1];
  __syncthreads();  // warp_sums is free for the next call
  return v;
}

/// CTA s (one per slot) of scan_threads, over that slot's counts and start (keys · count_shards
/// each) and tiles (pitch tiles_pitch), a thread per key in passes of scan_threads keys (coalesced):
/// start = exclusive prefix sum of the counts, so that a key's rows are contiguous; tiles[t]
/// describes tile t of the lists (tile_rows rows of one key), so that an attention CTA finds its
/// rows in one load; tile_count[s] = the slot's tiles.
template <class Count>  // a template so that every translation unit may define it (header-only)
__global__ void __launch_bounds__(scan_threads) scan_slots_kernel(const Count* counts, std::int64_t keys, std::int32_t* start,
                                                                  std::int64_t* tile_count, list_tile* tiles_out,
                                                                  std::int64_t tiles_pitch) {
  counts += blockIdx.x * keys * count_shards;
  start += blockIdx.x * keys * count_shards;
  tiles_out += blockIdx.x * tiles_pitch;
  __shared__ rows_tiles warp_sums[scan_threads / 32];
  rows_tiles before{0, 0};  // the sums of the earlier passes
  for (std::int64_t x0 = 0; x0 < keys; x0 += scan_threads) {
    const std::int64_t x = x0 + threadIdx.x;
    alignas(16) std::int32_t n[count_shards] = {};
    if (x < keys)
#pragma unroll
      for (int v = 0; v < count_shards / 4; ++v)  // 16-byte loads: a key's shards are 32-byte aligned
        reinterpret_cast<int4*>(n)[v] = reinterpret_cast<const int4*>(counts + x * count_shards)[v];
    std::int64_t rows = 0;
    for (const std::int32_t shard : n) rows += shard;
    const std::int64_t tiles = (rows + tile_rows - 1) / tile_rows;
    rows_tiles total;
    const rows_tiles end = scan_rows_tiles({rows, tiles}, warp_sums, total);
    if (x < keys) {
      const std::int64_t first = before.rows + end.rows - rows;
      alignas(16) std::int32_t at[count_shards];
      std::int64_t next = first;
      for (int shard = 0; shard < count_shards; ++shard) {
        at[shard] = static_cast<std::int32_t>(next);
        next += n[shard];
      }
#pragma unroll
      for (int v = 0; v < count_shards / 4; ++v)
        reinterpret_cast<int4*>(start + x * count_shards)[v] = reinterpret_cast<const int4*>(at)[v];
      std::int64_t tile = before.tiles + end.tiles - tiles;
      for (std::int64_t done = 0; done < rows; done += tile_rows)
        tiles_out[tile++] = {first + done, static_cast<std::int32_t>(x), static_cast<std::int32_t>(rows - done < tile_rows ? rows - done : tile_rows)};
    }
    before.rows += total.rows;
    before.tiles += total.tiles;
  }
  if (threadIdx.x == 0) tile_count[blockIdx.x] = before.tiles;
}

/// rows[start[counter] + ...] = i · Hq + h for the entries of one slot (start, counts: that slot's
/// counters; a thread per flat entry x = row · Hq + h); counts run down to zero as the cursor.
template <class T>
__global__ void scatter_slot_kernel(core::fwd_params<T> p, const sequence_desc* table, const std::int32_t* sel,
                                    std::int64_t slot, std::int64_t total_blocks, const std::int32_t* start,
                                    std::int32_t* counts, std::int32_t* rows) {
  const std::int64_t x = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= table[p.seqs.count].row_offset * p.q_heads) return;
  const std::int64_t row = x / p.q_heads, h = x % p.q_heads;
  const std::int64_t s = find_sequence(table, p.seqs.count, row, [](const sequence_desc& e) { return e.row_offset; });
  const sequence_desc e = table[s];
  const std::int64_t i = row - e.row_offset;
  const std::int64_t c = core::current_block(e.seq.pos(i), p.block_size);
  if (slot >= core::history_count(c, p.top_k, false)) return;
  const std::int32_t j = sel[x * p.top_k + slot];  // ascending: the history blocks come before c
  if (j < 0 || j >= c) return;
  const std::int64_t counter = slot_counter(x, list_key(p.kv_head(h), total_blocks, e, j));
  rows[start[counter] + atomicSub(&counts[counter], 1) - 1] = static_cast<std::int32_t>(i * p.q_heads + h);
}

}  // namespace moba::backends::cuda
