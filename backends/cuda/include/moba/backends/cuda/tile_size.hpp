// SPDX-License-Identifier: MIT
/// @file Tile sizes shared by the launchers (host) and the kernels (device): one definition.
#pragma once

#include <cstdint>

namespace moba::backends::cuda {

/// Attention tiles: 128 query rows (two warpgroups of 64 rows for wgmma, eight warps of 16 rows
/// for mma.sync) against 128-key tiles, double-buffered.
inline constexpr int tile_rows = 128;
inline constexpr int tile_keys = 128;
inline constexpr int kv_stages = 2;
inline constexpr int attention_threads = 256;

/// Gate: queries per CTA, threads per query and block means per shared-memory tile (one thread per
/// query, two queries per thread and 32-block tiles all measured slower, docs/perf.md).
inline constexpr int gate_rows = 64;
inline constexpr int gate_split = 4;
inline constexpr int gate_tile_blocks = 16;
inline constexpr int gate_threads = gate_rows * gate_split;
/// The gate keeps each thread's best history blocks in a fixed array: sparse top_k <= max_top_k.
inline constexpr int max_top_k = 64;

}  // namespace moba::backends::cuda
