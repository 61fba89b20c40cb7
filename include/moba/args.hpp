// SPDX-License-Identifier: MIT
/// @file The arguments of each pass: views of the caller's tensors and the sequences' offsets.
#pragma once

#include <cstdint>
#include <span>

#include <moba/dtype.hpp>
#include <moba/kv_cache.hpp>
#include <moba/tensor_view.hpp>

namespace moba {

/// Packed offsets in the backend's device memory, flash-attention's varlen convention: `batch + 1`
/// offsets each, and upper bounds of every sequence's lengths, which size the launches and the
/// workspace. A call with them does no host work on the offsets: the host cannot read them, so what
/// it cannot check (see the CUDA backend's header) the kernels make safe instead. moba::cuda only.
struct device_offsets {
  const std::int32_t* cu_seqlens_q = nullptr;  // device memory, [batch + 1]
  const std::int32_t* cu_seqlens_k = nullptr;  // device memory, [batch + 1]
  std::int64_t batch = 0;
  std::int64_t max_seqlen_q = 0;
  std::int64_t max_seqlen_k = 0;
  bool given() const { return cu_seqlens_q != nullptr || cu_seqlens_k != nullptr || batch != 0; }
};

/// The tensors of one forward call. Activations are `[batch, seq, heads, dim]` views (see
/// tensor_view.hpp for the packed, padded and Hugging Face layouts); the head dim is contiguous.
/// Packed varlen: batch = 1 and `cu_seqlens_q/k` (host arrays of `sequences + 1` offsets) or
/// `device_seqlens`. Padded: no offsets, each batch row is one sequence of the full seq extent.
template <class Dtype>
struct forward_args {
  view4<const Dtype> q;  // [batch, q_tokens, Hq, D]
  view4<const Dtype> k;  // [batch, k_tokens, Hkv, D]
  view4<const Dtype> v;  // [batch, k_tokens, Hkv, D]
  view4<Dtype> out;      // [batch, q_tokens, Hq, D]; left empty by attention::gate
  /// Optional natural-log log-sum-exp of the attended scores, `[batch, q_tokens, Hq]`.
  tensor_view<accum_t<Dtype>, 3> lse = {};
  /// Optional selected key blocks, `[batch, q_tokens, Hq, width]`, ascending, padded with -1.
  /// width >= min(top_k, blocks of the longest sequence) in sparse mode, >= its blocks in full mode.
  tensor_view<std::int32_t, 4> selected = {};
  std::span<const std::int32_t> cu_seqlens_q = {};
  std::span<const std::int32_t> cu_seqlens_k = {};
  /// Optional input `[batch, q_tokens, Hq, width]`: the blocks to attend in place of the gate's
  /// choice (SPEC §Blocks 7), e.g. an earlier call's `selected`. Not together with `selected`.
  tensor_view<const std::int32_t, 4> selection = {};
  device_offsets device_seqlens = {};
};

/// The tensors of one backward call (SPEC §Backward): gradients of the forward pass with its block
/// selection held fixed. `out` and `lse` are the forward's; dk/dv sum over the query heads of a kv head.
template <class Dtype>
struct backward_args {
  view4<const Dtype> q, k, v;
  view4<const Dtype> out;                    // [batch, q_tokens, Hq, D], from forward
  view4<const Dtype> dout;                   // [batch, q_tokens, Hq, D]
  tensor_view<const accum_t<Dtype>, 3> lse;  // [batch, q_tokens, Hq], from forward
  view4<Dtype> dq;                           // like q
  view4<Dtype> dk;                           // like k
  view4<Dtype> dv;                           // like v
  std::span<const std::int32_t> cu_seqlens_q = {};
  std::span<const std::int32_t> cu_seqlens_k = {};
  /// Optional `[batch, q_tokens, Hq, width]`: the forward's `selected` (or the selection it was given),
  /// held fixed (SPEC §Blocks 6, 7). Without it the backend recomputes the gate, with the same result.
  tensor_view<const std::int32_t, 4> selection = {};
};

/// One decode step (SPEC §Decode with a KV cache): each sequence's new token is appended to the
/// cache (k_new/v_new written at slot seqlens[b], its MoBA block's key sum updated), then its query
/// attends over the cache at pos = seqlens[b]. The caller advances seqlens afterwards.
template <class Dtype>
struct decode_args {
  view4<const Dtype> q;      // [batch, 1, Hq, D]
  view4<const Dtype> k_new;  // [batch, 1, Hkv, D]
  view4<const Dtype> v_new;  // [batch, 1, Hkv, D]
  paged_kv_cache<Dtype> cache;
  view4<Dtype> out;  // [batch, 1, Hq, D]
  tensor_view<accum_t<Dtype>, 3> lse = {};
  tensor_view<std::int32_t, 4> selected = {};
};

}  // namespace moba
