// SPDX-License-Identifier: MIT
/// @file Attended query-key pairs and FLOPs of a forward or backward pass, known without running it.
#pragma once

#include <cstdint>

#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/detail/macros.hpp>

namespace moba::core {

/// Keys query `i` attends to: the causal part of its current block plus its history blocks,
/// which are whole blocks (they lie wholly in the past), so the count needs no gate scores.
MOBA_HOST_DEVICE std::int64_t attended_keys(std::int64_t pos, std::int64_t block_size, std::int64_t top_k,
                                            bool full) {
  const std::int64_t c = current_block(pos, block_size);
  return (pos - c * block_size + 1) + history_count(c, top_k, full) * block_size;
}

/// Attended pairs of one head of a sequence with `q_len` queries over `k_len` keys.
inline std::int64_t attended_pairs(std::int64_t q_len, std::int64_t k_len, std::int64_t block_size,
                                   std::int64_t top_k, bool full) {
  std::int64_t pairs = 0;
  for (std::int64_t i = 0; i < q_len; ++i) pairs += attended_keys(k_len - q_len + i, block_size, top_k, full);
  return pairs;
}

/// Forward FLOPs: 2·D for q·k and 2·D for p·v per attended pair (flash-attention's convention).
inline double forward_flops(std::int64_t pairs, std::int64_t head_dim) {
  return 4.0 * static_cast<double>(pairs) * static_cast<double>(head_dim);
}

/// Backward FLOPs: 2.5× the forward's (q·k, dout·v, dv, dk and dq products; flash-attention's
/// convention), whatever a backend recomputes beyond them.
inline double backward_flops(std::int64_t pairs, std::int64_t head_dim) { return 2.5 * forward_flops(pairs, head_dim); }

}  // namespace moba::core
