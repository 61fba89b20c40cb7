// SPDX-License-Identifier: MIT
/// @file Selection slots -> per-block row lists (a counting sort). Slot s of a query is its s-th
/// history block (ascending); a query appears at most once per slot, so the attention of one slot
/// can merge each row's result into `out` without atomics. The counts and their scans cover every
/// slot at once (small: slots × kv heads × blocks); the row lists, as large as the queries, one slot
/// at a time.
#pragma once

#include <cstdint>

#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// Calls f(slot, i, h, key) for the (query i of sequence e, head h) of flat thread index x (over
/// rows × Hq) and each of its history slots in [first, last); key = kvh · total_blocks + the block's
/// global index.
template <class T, class F>
__device__ void for_slot_entries(const core::fwd_params<T>& p, const sequence_desc* table, const std::int32_t* sel,
                                 std::int64_t first, std::int64_t last, std::int64_t total_blocks, F f) {
  const std::int64_t x = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= table[p.seqs.count].row_offset * p.q_heads) return;
  const std::int64_t row = x / p.q_heads, h = x % p.q_heads;
  const std::int64_t s = find_sequence(table, p.seqs.count, row, [](const sequence_desc& e) { return e.row_offset; });
  const sequence_desc& e = table[s];
  const std::int64_t i = row - e.row_offset;
  const std::int64_t c = core::current_block(e.seq.pos(i), p.block_size);
  const std::int64_t history = core::history_count(c, p.top_k, false), end = last < history ? last : history;
  const std::int64_t base = p.kv_head(h) * total_blocks + e.block_offset;
  for (std::int64_t slot = first; slot < end; ++slot) {
    const std::int32_t j = sel[x * p.top_k + slot];  // ascending: the history blocks come before c
    if (j >= 0 && j < c) f(slot, i, h, base + j);
  }
}

/// counts[slot · keys + key] = the rows whose history block in `slot` is `key`, for every slot.
template <class T>
__global__ void count_slots_kernel(core::fwd_params<T> p, const sequence_desc* table, const std::int32_t* sel,
                                   std::int64_t slots, std::int64_t total_blocks, std::int32_t* counts) {
  const std::int64_t keys = p.kv_heads * total_blocks;
  for_slot_entries(p, table, sel, 0, slots, total_blocks, [&](std::int64_t slot, std::int64_t, std::int64_t, std::int64_t key) {
    atomicAdd(&counts[slot * keys + key], 1);
  });
}

/// One tile of a slot's row lists: rows[first, first + count) of the list of key `key`.
struct list_tile {
  std::int64_t first;
  std::int32_t key;
  std::int32_t count;
};

/// CTA s (one per slot) of scan_threads, over that slot's rows of counts / start / tile_start
/// (pitch n, n + 1, n + 1) and tiles (pitch tiles_pitch): start = exclusive prefix sum of
/// counts[0, n), tile_start = the same of their tile_rows tile counts; both get the total at index
/// n. tiles[t] describes tile t, so that an attention CTA finds its rows in one load.
inline constexpr int scan_threads = 1024;
template <class Count>  // a template so that every translation unit may define it (header-only)
__global__ void __launch_bounds__(scan_threads) scan_slots_kernel(const Count* counts, std::int64_t n, std::int64_t* start,
                                                                  std::int64_t* tile_start, list_tile* tiles_out,
                                                                  std::int64_t tiles_pitch) {
  counts += blockIdx.x * n;
  start += blockIdx.x * (n + 1);
  tile_start += blockIdx.x * (n + 1);
  tiles_out += blockIdx.x * tiles_pitch;
  __shared__ std::int64_t rows_part[scan_threads], tiles_part[scan_threads];
  const int tid = threadIdx.x;
  const std::int64_t chunk = (n + scan_threads - 1) / scan_threads;
  const std::int64_t b = tid * chunk, e = b + chunk < n ? b + chunk : n;
  auto tiles_of = [&](std::int64_t x) -> std::int64_t { return (counts[x] + tile_rows - 1) / tile_rows; };
  std::int64_t rows = 0, tiles = 0;
  for (std::int64_t x = b; x < e; ++x) {
    rows += counts[x];
    tiles += tiles_of(x);
  }
  rows_part[tid] = rows;
  tiles_part[tid] = tiles;
  for (int off = 1; off < scan_threads; off *= 2) {  // inclusive Hillis-Steele scan
    __syncthreads();
    const std::int64_t a = tid >= off ? rows_part[tid - off] : 0, t = tid >= off ? tiles_part[tid - off] : 0;
    __syncthreads();
    rows_part[tid] += a;
    tiles_part[tid] += t;
  }
  rows = rows_part[tid] - rows;
  tiles = tiles_part[tid] - tiles;
  for (std::int64_t x = b; x < e; ++x) {
    start[x] = rows;
    tile_start[x] = tiles;
    const std::int32_t count = static_cast<std::int32_t>(counts[x]);
    for (std::int32_t done = 0; done < count; done += tile_rows)
      tiles_out[tiles++] = {rows + done, static_cast<std::int32_t>(x), count - done < tile_rows ? count - done : tile_rows};
    rows += count;
  }
  if (tid == scan_threads - 1) {
    start[n] = rows_part[tid];
    tile_start[n] = tiles_part[tid];
  }
}

/// rows[start[key] + ...] = i · Hq + h for the entries of one slot (start, counts: that slot's rows);
/// counts run down to zero as the cursor.
template <class T>
__global__ void scatter_slot_kernel(core::fwd_params<T> p, const sequence_desc* table, const std::int32_t* sel,
                                    std::int64_t slot, std::int64_t total_blocks, const std::int64_t* start,
                                    std::int32_t* counts, std::int32_t* rows) {
  for_slot_entries(p, table, sel, slot, slot + 1, total_blocks, [&](std::int64_t, std::int64_t i, std::int64_t h, std::int64_t key) {
    rows[start[key] + atomicSub(&counts[key], 1) - 1] = static_cast<std::int32_t>(i * p.q_heads + h);
  });
}

}  // namespace moba::backends::cuda
