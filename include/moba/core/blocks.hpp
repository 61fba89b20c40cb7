// SPDX-License-Identifier: MIT
/// @file Block partitioning of the keys (SPEC §Blocks 1 and 4).
#pragma once

#include <cstdint>

#include <moba/detail/macros.hpp>

namespace moba::core {

/// Number of key blocks of a sequence of `k_len` keys; the last may be partial. Written without
/// `k_len + block_size - 1`, which overflows for block sizes near 2^63.
MOBA_HOST_DEVICE std::int64_t block_count(std::int64_t k_len, std::int64_t block_size) {
  return k_len / block_size + (k_len % block_size != 0);
}

MOBA_HOST_DEVICE std::int64_t block_begin(std::int64_t j, std::int64_t block_size) { return j * block_size; }

/// End of block j clipped to `k_len`; for a block that begins at or before k_len, without overflow.
MOBA_HOST_DEVICE std::int64_t block_end(std::int64_t j, std::int64_t block_size, std::int64_t k_len) {
  const std::int64_t begin = j * block_size;
  return k_len - begin > block_size ? begin + block_size : k_len;
}

/// The block holding key position `pos`: the query's current block c(i) = floor(pos / B).
MOBA_HOST_DEVICE std::int64_t current_block(std::int64_t pos, std::int64_t block_size) { return pos / block_size; }

/// Keys [begin, end) of block j that the query at `pos` attends (SPEC §Attention): the whole block
/// for a history block, the causal part up to pos for its current block.
struct key_range {
  std::int64_t begin, end;
};
MOBA_HOST_DEVICE key_range attended_range(std::int64_t j, std::int64_t pos, std::int64_t block_size) {
  return {block_begin(j, block_size), block_end(j, block_size, pos + 1)};
}

}  // namespace moba::core
