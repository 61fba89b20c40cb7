// SPDX-License-Identifier: MIT
/// @file The persistent attention kernel and its work items: query tiles (causal_items: mode full,
/// and the current block of mode sparse) or the gathered rows that chose one key block in one
/// selection slot (history_items). Passes merge into `out` through a log-sum-exp buffer (epilogue.cuh).
#pragma once

#include <cstdint>

#include <moba/backends/cuda/attention_tile.cuh>
#include <moba/backends/cuda/epilogue.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/slots.cuh>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {
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
    const core::key_range keys = core::attended_range(c, pos, p.block_size);
    m.lo[r] = used && !p.full ? keys.begin : 0;
    m.hi[r] = used ? keys.end : 0;
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

}  // namespace moba::backends::cuda
