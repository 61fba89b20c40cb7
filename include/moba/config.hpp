// SPDX-License-Identifier: MIT
/// @file moba::config: the parameters of one attention layer.
#pragma once

#include <cstdint>
#include <optional>

namespace moba {

/// `sparse`: MoBA gating (SPEC §Blocks). `full`: every past key, i.e. dense causal attention
/// through the same call (the paper keeps some layers dense).
enum class mode { sparse, full };

struct config {
  /// Keys per block, B >= 1 (SPEC §Blocks 1).
  std::int64_t block_size = 64;
  /// Blocks each query attends to, the current block included, K >= 1 (SPEC §Blocks 5).
  std::int64_t top_k = 3;
  /// Multiplies q·k before the softmax; unset means 1/sqrt(head_dim).
  std::optional<double> softmax_scale;
  moba::mode mode = mode::sparse;
};

}  // namespace moba
