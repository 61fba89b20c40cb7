// SPDX-License-Identifier: MIT
/// @file Tile sizes shared by the launchers (host) and the kernels (device): one definition.
#pragma once

#include <cstdint>

namespace moba::backends::cuda {

/// Query rows per attention tile (4 warps × 16 rows of mma.m16n8k16) and keys per key tile.
inline constexpr int tile_rows = 64;
inline constexpr int tile_keys = 64;
inline constexpr int attention_threads = 128;
/// Padding (elements) of shared-memory rows so that the fragment loads of a warp hit 32 banks.
inline constexpr int smem_pad = 8;

/// Gate: queries per CTA, threads per query and block means per shared-memory tile
/// (one thread per query and 32-block tiles measured slower, docs/perf.md).
inline constexpr int gate_rows = 64;
inline constexpr int gate_split = 4;
inline constexpr int gate_tile_blocks = 16;
inline constexpr int gate_threads = gate_rows * gate_split;
/// The gate keeps each thread's best history blocks in a fixed array: sparse top_k <= max_top_k.
inline constexpr int max_top_k = 64;

/// Sparse attention gathers, per query range of `range_rows` queries, the rows that chose each key
/// block (docs/design.md "CUDA backend"). Larger ranges fill gathered tiles better but need more scratch.
inline constexpr int range_rows = 1024;

/// Shared memory of the tensor-core attention kernel for head dim D and 16-bit elements.
constexpr std::int64_t attention_smem_bytes(int d) {
  return 2 * (2 * tile_rows * (d + smem_pad) + d * (tile_keys + smem_pad)) + tile_rows * 2 * 4;
}

}  // namespace moba::backends::cuda
