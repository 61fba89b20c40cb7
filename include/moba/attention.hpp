// SPDX-License-Identifier: MIT
/// @file moba::attention<Backend, Dtype>: the one entry point. Validates, builds params, calls the backend.
#pragma once

#include <cstdint>
#include <span>
#include <utility>

#include <moba/config.hpp>
#include <moba/detail/validate.hpp>
#include <moba/fwd.hpp>
#include <moba/kv_cache.hpp>
#include <moba/tensor_view.hpp>

namespace moba {

/// The tensors of one forward call. Activations are `[batch, seq, heads, dim]` views (see
/// tensor_view.hpp for the packed, padded and Hugging Face layouts); the head dim is contiguous.
/// Packed varlen: batch = 1 and `cu_seqlens_q/k` (host arrays of `sequences + 1` offsets).
/// Padded: no cu_seqlens, each batch row is one sequence of the full seq extent.
template <class Dtype>
struct forward_args {
  view4<const Dtype> q;  // [batch, q_tokens, Hq, D]
  view4<const Dtype> k;  // [batch, k_tokens, Hkv, D]
  view4<const Dtype> v;  // [batch, k_tokens, Hkv, D]
  view4<Dtype> out;      // [batch, q_tokens, Hq, D]
  /// Optional natural-log log-sum-exp of the attended scores, `[batch, q_tokens, Hq]`.
  tensor_view<accum_t<Dtype>, 3> lse = {};
  /// Optional selected key blocks, `[batch, q_tokens, Hq, width]`, ascending, padded with -1.
  /// width >= top_k in sparse mode, >= the block count of the longest sequence in full mode.
  tensor_view<std::int32_t, 4> selected = {};
  std::span<const std::int32_t> cu_seqlens_q = {};
  std::span<const std::int32_t> cu_seqlens_k = {};
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

/// Mixture of Block Attention on one backend (`moba::reference`, `moba::cpu`, `moba::cuda`) and one
/// element type (`double`, `float`, `moba::bfloat16`, `moba::float16`). See SPEC.md for the math.
template <class Backend, class Dtype>
class attention {
 public:
  /// Throws moba::invalid_argument for block_size < 1, top_k < 1 or a non-finite softmax_scale.
  /// Extra arguments go to the backend (e.g. a CUDA stream).
  template <class... BackendArgs>
  explicit attention(config cfg, BackendArgs&&... backend_args)
      : cfg_((detail::validate_config(cfg), cfg)), impl_(cfg_, std::forward<BackendArgs>(backend_args)...) {}

  /// Computes out (and lse, selected when given). Every argument is checked first; on error a
  /// moba::invalid_argument is thrown and no output has been touched.
  void forward(const forward_args<Dtype>& a) {
    const core::fwd_params<Dtype> p = forward_params(a);
    impl_.check(p);
    impl_.forward(p);
  }

  /// Bytes of workspace `forward(a)` needs, on backends that can run in caller memory (moba::cuda:
  /// `backend().set_workspace(ptr, bytes)`). The arguments are validated as forward validates them; the
  /// backend's own limits (alignment, top_k, the workspace's size) are left to forward.
  std::int64_t workspace_size(const forward_args<Dtype>& a) const
    requires requires(const backend_impl<Backend, Dtype>& b, const core::fwd_params<Dtype>& p) { b.workspace_size(p); }
  {
    return impl_.workspace_size(forward_params(a));
  }

  /// Computes dq, dk, dv (SPEC §Backward). Checked like forward; available on backends that
  /// implement it (today: moba::reference), a compile-time error elsewhere.
  void backward(const backward_args<Dtype>& a) {
    using impl = backend_impl<Backend, Dtype>;
    static_assert(requires(impl& b, const core::bwd_params<Dtype>& p) { b.backward(p); },
                  "moba: this backend has no backward pass yet");
    const core::bwd_params<Dtype> p = detail::make_bwd_params<Dtype>(
        cfg_, a.q, a.k, a.v, a.out, a.dout, a.lse, a.dq, a.dk, a.dv, a.cu_seqlens_q, a.cu_seqlens_k);
    require_head_dim(p.head_dim);
    impl_.check(p);
    impl_.backward(p);
  }

  /// One decode step (see decode_args). Checked like forward; available on backends that implement
  /// it (today: moba::reference), a compile-time error elsewhere.
  void decode(const decode_args<Dtype>& a) {
    using impl = backend_impl<Backend, Dtype>;
    static_assert(requires(impl& b, const core::decode_params<Dtype>& p) { b.decode(p); },
                  "moba: this backend has no decode pass yet");
    const core::decode_params<Dtype> p =
        detail::make_decode_params<Dtype>(cfg_, a.q, a.k_new, a.v_new, a.cache, a.out, a.lse, a.selected);
    require_head_dim(p.head_dim);
    impl_.decode(p);
  }

  const config& cfg() const { return cfg_; }
  /// Backend-specific state and options (streams, workspaces).
  backend_impl<Backend, Dtype>& backend() { return impl_; }

 private:
  core::fwd_params<Dtype> forward_params(const forward_args<Dtype>& a) const {
    const core::fwd_params<Dtype> p = detail::make_fwd_params<Dtype>(cfg_, a.q, a.k, a.v, a.out, a.lse, a.selected,
                                                                      a.cu_seqlens_q, a.cu_seqlens_k);
    require_head_dim(p.head_dim);
    return p;
  }
  static void require_head_dim(std::int64_t d) {
    using impl = backend_impl<Backend, Dtype>;
    detail::require(impl::supports_head_dim(d), impl::name, " supports head dims ", impl::head_dims(), "; got ", d);
  }

  config cfg_;
  backend_impl<Backend, Dtype> impl_;
};

}  // namespace moba
