// SPDX-License-Identifier: MIT
/// @file The per-sequence table the kernels read (host-built and uploaded, or built on the device from
/// device offsets: table.cuh) and its lookup.
#pragma once

#include <cstdint>

#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/blocks.hpp>
#include <moba/detail/macros.hpp>
#include <moba/tensor_view.hpp>
#include <moba/varlen.hpp>

namespace moba::backends::cuda {

/// One sequence plus the prefix offsets that map a flat kernel index (block, tile, row) to it.
/// Entry `count` of a table holds only the totals in its offsets.
struct sequence_desc {
  sequence_info seq;
  std::int64_t block_offset = 0;  // key blocks of earlier sequences
  std::int64_t tile_offset = 0;   // tile_rows query tiles of earlier sequences
  std::int64_t row_offset = 0;    // queries of earlier sequences
};

/// What one sequence adds to the table's offsets: its key blocks, query tiles and queries.
struct table_counts {
  std::int64_t blocks, tiles, rows;
};
MOBA_HOST_DEVICE table_counts counts_of(const sequence_info& seq, std::int64_t block_size) {
  return {core::block_count(seq.k_len, block_size), (seq.q_len + tile_rows - 1) / tile_rows, seq.q_len};
}

/// The sequence `s` with `offset(table[s]) <= x < offset(table[s + 1])`, by binary search; `count` sequences.
template <class Offset>
MOBA_HOST_DEVICE std::int64_t find_sequence(const sequence_desc* table, std::int64_t count, std::int64_t x,
                                            Offset offset) {
  std::int64_t lo = 0, hi = count;  // invariant: offset(lo) <= x < offset(hi)
  while (hi - lo > 1) {
    const std::int64_t mid = (lo + hi) / 2;
    if (offset(table[mid]) <= x) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace moba::backends::cuda
