// SPDX-License-Identifier: MIT
/// @file How the sequences of a call are laid out: packed varlen (cu_seqlens) or padded batch.
#pragma once

#include <cstdint>

#include <moba/detail/macros.hpp>

namespace moba {

/// One sequence of a call. Its query `i` reads `q(batch, q_start + i, ...)` and sits at absolute
/// key position `pos(i) = k_len - q_len + i` (SPEC §Inputs: bottom-right alignment).
struct sequence_info {
  std::int64_t batch = 0;  // index into the batch dimension of the views
  std::int64_t q_start = 0;
  std::int64_t k_start = 0;
  std::int64_t q_len = 0;
  std::int64_t k_len = 0;

  MOBA_HOST_DEVICE std::int64_t pos(std::int64_t i) const { return k_len - q_len + i; }
};

/// Either `cu_seqlens_q/k` (count + 1 offsets into the seq dimension of a batch-1 view) or, when
/// they are null, `count` padded sequences of lengths `padded_q_len`, `padded_k_len`.
/// `max_q_len`/`max_k_len` bound every sequence's lengths (exact for host offsets and padding).
/// `on_device`: the offsets lie in device memory (moba::cuda), unchecked; the host must not index them.
struct sequence_layout {
  const std::int32_t* cu_seqlens_q = nullptr;
  const std::int32_t* cu_seqlens_k = nullptr;
  std::int64_t count = 0;
  std::int64_t padded_q_len = 0;
  std::int64_t padded_k_len = 0;
  std::int64_t max_q_len = 0;
  std::int64_t max_k_len = 0;
  bool on_device = false;

  MOBA_HOST_DEVICE sequence_info operator[](std::int64_t s) const {
    if (cu_seqlens_q != nullptr) {
      const std::int64_t q0 = cu_seqlens_q[s], k0 = cu_seqlens_k[s];
      return {0, q0, k0, cu_seqlens_q[s + 1] - q0, cu_seqlens_k[s + 1] - k0};
    }
    return {s, 0, 0, padded_q_len, padded_k_len};
  }
};

}  // namespace moba
