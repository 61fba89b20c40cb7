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

/// Where entry w of the selection of query row `row` (row_offset + i) and head h lies in the gate's
/// workspace `[rows, Hq, K]`.
__device__ __forceinline__ std::int64_t selection_index(std::int64_t row, std::int64_t h, std::int64_t w, std::int64_t q_heads,
                                                        std::int64_t top_k) {
  return (row * q_heads + h) * top_k + w;
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

/// One tile of a slot's row lists: rows[first, first + count), listed for keys key .. key + span − 1
/// (consecutive blocks of one sequence and kv head; span > 1 joins the last, partial tiles of their
/// lists into one work item, whose rows each attend their own block).
struct list_tile {
  std::int64_t first;
  std::int32_t key;
  std::int16_t count, span;
};

/// A joined tile spans at most max_joined_keys keys (longer blocks are never joined). Joining saves
/// a work item's fixed cost (about that of 2.4 key tiles, docs/perf.md) without adding key tiles,
/// but long items unbalance the end of a pass: same-run H100, B=128/K=16 31.0 -> 28.9 ms with 4 or
/// 8 tiles, while joining pairs of 4-tile blocks (32K, B=512) measured 1-2% slower.
inline constexpr std::int64_t max_joined_keys = 4 * tile_keys;

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

/// Which partial tiles of a warp's 32 consecutive keys join (list_tile), greedily lane by lane: a
/// key's partial tile joins the open chain when its block follows the previous key's in the same
/// sequence and kv head (`joins`) and the rows still fit one tile; the chain stays open after it
/// only if the key has no full tiles (their rows would lie between). Every lane runs the same loop
/// on broadcast values. Returns whether this lane's partial tile joined an earlier key's;
/// `rows_here` and `span_here` (the caller sets them to the lane's own tail and 1) get the chain's
/// rows and keys where this lane starts one.
__device__ __forceinline__ bool join_tails(std::int64_t rows, bool joins, int max_span, std::int16_t& rows_here,
                                           std::int16_t& span_here) {
  const int lane = threadIdx.x % 32;
  bool joined = false, open = false;
  int start = 0, sum = 0, span = 0;
  const auto close = [&] {
    if (start == lane) rows_here = static_cast<std::int16_t>(sum), span_here = static_cast<std::int16_t>(span);
  };
  for (int l = 0; l < 32; ++l) {
    const std::int64_t rows_l = __shfl_sync(~0u, rows, l);
    const bool joins_l = __shfl_sync(~0u, joins, l);
    const int tail = static_cast<int>(rows_l % tile_rows);
    if (open && joins_l && tail > 0 && sum + tail <= tile_rows && span < max_span) {
      sum += tail;
      ++span;
      joined |= l == lane;
      open = rows_l < tile_rows;
      if (!open) close();
    } else {
      if (open) close();
      start = l;
      sum = tail;
      span = 1;
      open = tail > 0;
    }
  }
  if (open) close();
  return joined;
}

/// CTA s (one per slot) of scan_threads, over that slot's counts and start (keys · count_shards
/// each) and tiles (pitch tiles_pitch), a thread per key in passes of scan_threads keys (coalesced):
/// start = exclusive prefix sum of the counts, so that a key's rows are contiguous; tiles[t]
/// describes tile t of the lists (join_tails: the partial tiles of consecutive keys may share one),
/// so that an attention CTA finds its rows in one load; tile_count[s] = the slot's tiles. A key's
/// partial tile comes last in its list, or first where it joined the key before.
template <class Count>  // a template so that every translation unit may define it (header-only)
__global__ void __launch_bounds__(scan_threads) scan_slots_kernel(const Count* counts, std::int64_t keys, std::int32_t* start,
                                                                  std::int64_t* tile_count, list_tile* tiles_out,
                                                                  std::int64_t tiles_pitch, const sequence_desc* table,
                                                                  std::int64_t sequences, std::int64_t total_blocks, int max_span) {
  counts += blockIdx.x * keys * count_shards;
  start += blockIdx.x * keys * count_shards;
  tiles_out += blockIdx.x * tiles_pitch;
  __shared__ rows_tiles warp_sums[scan_threads / 32];
  rows_tiles before{0, 0};  // the sums of the earlier passes
  for (std::int64_t x0 = 0; x0 < keys; x0 += scan_threads) {
    const std::int64_t x = x0 + threadIdx.x;
    alignas(16) std::int32_t n[count_shards] = {};
    bool joins = false;  // block x continues block x − 1 (same kv head and sequence)
    if (x < keys) {
#pragma unroll
      for (int v = 0; v < count_shards / 4; ++v)  // 16-byte loads: a key's shards are 32-byte aligned
        reinterpret_cast<int4*>(n)[v] = reinterpret_cast<const int4*>(counts + x * count_shards)[v];
      const std::int64_t gblock = x % total_blocks;
      const std::int64_t s = find_sequence(table, sequences, gblock, [](const sequence_desc& e) { return e.block_offset; });
      joins = table[s].block_offset != gblock;  // also false at gblock 0, a kv head's first key
    }
    std::int64_t rows = 0;
    for (const std::int32_t shard : n) rows += shard;
    const std::int64_t tail = rows % tile_rows;
    std::int16_t chain_rows = static_cast<std::int16_t>(tail), chain_span = 1;
    const bool joined = join_tails(rows, joins, max_span, chain_rows, chain_span);
    const std::int64_t tiles = rows / tile_rows + (tail > 0 && !joined);
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
      const auto key = static_cast<std::int32_t>(x);
      for (std::int64_t done = joined ? tail : 0; done + tile_rows <= rows; done += tile_rows)
        tiles_out[tile++] = {first + done, key, tile_rows, 1};
      if (tail > 0 && !joined) tiles_out[tile++] = {first + rows - tail, key, chain_rows, chain_span};
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
  const std::int32_t j = sel[selection_index(row, h, slot, p.q_heads, p.top_k)];  // ascending: history blocks before c
  if (j < 0 || j >= c) return;
  const std::int64_t counter = slot_counter(x, list_key(p.kv_head(h), total_blocks, e, j));
  rows[start[counter] + atomicSub(&counts[counter], 1) - 1] = static_cast<std::int32_t>(i * p.q_heads + h);
}

}  // namespace moba::backends::cuda
