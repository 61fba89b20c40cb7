// SPDX-License-Identifier: MIT
/// @file The typed parameters of each pass, validated and built once by moba::attention.
#pragma once

#include <cstdint>
#include <type_traits>

#include <moba/dtype.hpp>
#include <moba/tensor_view.hpp>
#include <moba/varlen.hpp>

namespace moba::core {

/// Head counts and gating parameters, shared by every pass.
struct attention_shape {
  std::int64_t q_heads = 0;
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t block_size = 0;
  std::int64_t top_k = 0;  // as configured; ignored in full mode
  bool full = false;       // mode::full: every past block is selected
  double softmax_scale = 0;

  /// GQA: query head h reads kv head h / group (SPEC §Inputs).
  MOBA_HOST_DEVICE std::int64_t kv_head(std::int64_t h) const { return h / (q_heads / kv_heads); }
};

/// The inputs of a prefill-style pass (forward, backward): packed or padded sequences.
template <class T>
struct problem : attention_shape {
  view4<const T> q;  // [batch, seq, Hq, D]
  view4<const T> k;  // [batch, seq, Hkv, D]
  view4<const T> v;  // [batch, seq, Hkv, D]
  sequence_layout seqs;
};

template <class T>
struct fwd_params : problem<T> {
  view4<T> out;                           // like q
  tensor_view<accum_t<T>, 3> lse;         // [batch, seq, Hq], optional (data == nullptr)
  tensor_view<std::int32_t, 4> selected;  // [batch, seq, Hq, width], optional
  /// Optional input `[batch, seq, Hq, width]`: the blocks each query attends, in place of the gate
  /// (SPEC §Blocks 7); top_k and mode then do not matter.
  tensor_view<const std::int32_t, 4> selection;
  bool gate_only = false;  // attention::gate: write `selected`, compute no attention
};

/// SPEC §Backward: gradients of the forward pass with the selection held fixed.
template <class T>
struct bwd_params : problem<T> {
  view4<const T> out;                    // the forward output, like q
  view4<const T> dout;                   // like q
  tensor_view<const accum_t<T>, 3> lse;  // the forward lse, [batch, seq, Hq]
  view4<T> dq;                           // like q
  view4<T> dk;                           // like k; sums over the query heads of each kv head
  view4<T> dv;                           // like v; likewise
  tensor_view<const std::int32_t, 4> selection;  // optional, as fwd_params::selection
};

/// SPEC §Decode: one new token per sequence, appended to a paged cache, then attended.
template <class T>
struct decode_params : attention_shape {
  view4<const T> q;                       // [batch, 1, Hq, D]
  view4<const T> k_new;                   // [batch, 1, Hkv, D]
  view4<const T> v_new;                   // [batch, 1, Hkv, D]
  view4<T> k_pages;                       // [num_pages, page_size, Hkv, D]
  view4<T> v_pages;                       // [num_pages, page_size, Hkv, D]
  tensor_view<gate_t<T>, 4> block_key_sums;       // [batch, max_blocks, Hkv, D]
  tensor_view<const std::int32_t, 2> page_table;  // [batch, max_pages]
  const std::int32_t* seqlens = nullptr;          // [batch], tokens cached before the call
  view4<T> out;                           // [batch, 1, Hq, D]
  tensor_view<accum_t<T>, 3> lse;         // [batch, 1, Hq], optional
  tensor_view<std::int32_t, 4> selected;  // [batch, 1, Hq, width], optional
};

static_assert(std::is_trivially_copyable_v<fwd_params<float>>);
static_assert(std::is_trivially_copyable_v<decode_params<float>>);
static_assert(std::is_trivially_copyable_v<bwd_params<float>>);

}  // namespace moba::core
