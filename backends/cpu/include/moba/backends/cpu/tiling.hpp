// SPDX-License-Identifier: MIT
/// @file Tile shapes of the CPU kernel, chosen at compile time from the SIMD width.
#pragma once

#include <algorithm>
#include <cstdint>

#include <xsimd/xsimd.hpp>

namespace moba::backends::cpu {

/// The register tile of both matrix products: `rows` query rows × `vectors` SIMD vectors.
/// 16 accumulators fit the 32 registers of AVX-512 and NEON; the 16 of SSE/AVX2 take 2 rows.
template <class A>
struct register_tile {
  using batch = xsimd::batch<A>;
  static constexpr int width = static_cast<int>(batch::size);
  static constexpr int vectors = 4;
  static constexpr int rows = sizeof(batch) >= 64 || XSIMD_WITH_NEON64 ? 4 : 2;
  /// Keys per chunk of a key block: one register tile of scores per row.
  static constexpr int chunk_keys = vectors * width;
};

/// Query tokens per work item: whole blocks, about 4096 rows (tokens × the kv head's query heads).
/// Every key chunk a tile visits is packed once for all the tile's rows that selected its block, so
/// long tiles amortise the packing; the rows' queries and running outputs (2 × 4096 × Dp values)
/// stay in the per-thread workspace.
inline std::int64_t query_tile_tokens(std::int64_t block_size, std::int64_t group) {
  const std::int64_t target = std::max<std::int64_t>(64, 4096 / group);
  return block_size >= target ? target : block_size * (target / block_size);
}

/// A query tile of one kv-head group of one sequence, with its estimated cost for scheduling.
struct work_item {
  std::int64_t seq, kv, i0, i1;
  double cost;
};

/// Head dim rounded up to whole SIMD vectors; the padding lanes hold zeros.
template <class A>
std::int64_t padded_dim(std::int64_t d) {
  constexpr std::int64_t w = register_tile<A>::width;
  return (d + w - 1) / w * w;
}

}  // namespace moba::backends::cpu
