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

/// Gate: query tiles of tile_rows rows against tiles of 16 block means (scores double-buffered,
/// kbar in gate_kbar_stages; 16, not 32, keeps two CTAs per SM up to top_k = 16 for bf16).
inline constexpr int gate_tile_blocks = 16;
/// The gate keeps each query's best K − 1 blocks in shared memory, 1 KiB per entry and 128-row
/// tile (63 KiB at the limit): sparse top_k <= max_top_k.
inline constexpr int max_top_k = 64;

}  // namespace moba::backends::cuda
