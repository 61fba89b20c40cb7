// SPDX-License-Identifier: MIT
/// @file moba::attention<Backend, Dtype>: the one entry point. Validates, builds params, calls the backend.
#pragma once

#include <cstdint>
#include <span>
#include <utility>

#include <moba/args.hpp>
#include <moba/config.hpp>
#include <moba/detail/validate.hpp>
#include <moba/fwd.hpp>
#include <moba/kv_cache.hpp>
#include <moba/tensor_view.hpp>

namespace moba {

/// Mixture of Block Attention on one backend (`moba::reference`, `moba::cpu`, `moba::cuda`) and one
/// element type (`double`, `float`, `moba::bfloat16`, `moba::float16`). See SPEC.md for the math.
template <class Backend, class Dtype>
class attention {
 public:
  /// Throws moba::invalid_argument for block_size < 1, top_k < 1 or a softmax_scale that is not finite
  /// or exceeds detail::max_softmax_scale in magnitude.
  /// Extra arguments go to the backend (e.g. a CUDA stream).
  template <class... BackendArgs>
  explicit attention(config cfg, BackendArgs&&... backend_args)
      : cfg_((detail::validate_config(cfg), cfg)), impl_(cfg_, std::forward<BackendArgs>(backend_args)...) {}

  /// Computes out (and lse, selected when given). Every argument is checked first; on error a
  /// moba::invalid_argument is thrown and no output has been touched.
  void forward(const forward_args<Dtype>& a) {
    const core::fwd_params<Dtype> p = forward_params(a, false);
    impl_.check(p);
    impl_.forward(p);
  }

  /// forward with per-call backend options (moba::cuda: the stream and the workspace of this call).
  template <class Impl = backend_impl<Backend, Dtype>>
  void forward(const forward_args<Dtype>& a, const typename Impl::call_options& call) {
    const core::fwd_params<Dtype> p = forward_params(a, false);
    impl_.check(p, call);
    impl_.forward(p, call);
  }

  /// The gate alone (SPEC §Blocks 2–5): writes `selected` (required) and computes no attention;
  /// out, lse and selection stay empty. For diagnostics, and to hand a selection to a later call.
  void gate(const forward_args<Dtype>& a) {
    const core::fwd_params<Dtype> p = forward_params(a, true);
    impl_.check(p);
    impl_.forward(p);
  }

  template <class Impl = backend_impl<Backend, Dtype>>
  void gate(const forward_args<Dtype>& a, const typename Impl::call_options& call) {
    const core::fwd_params<Dtype> p = forward_params(a, true);
    impl_.check(p, call);
    impl_.forward(p, call);
  }

  /// Bytes of workspace `forward(a)` needs, on backends that can run in caller memory (moba::cuda).
  /// The arguments are validated as forward validates them; the backend's own limits (alignment,
  /// top_k, the workspace's size) are left to forward.
  std::int64_t workspace_size(const forward_args<Dtype>& a) const
    requires requires(const backend_impl<Backend, Dtype>& b, const core::fwd_params<Dtype>& p) { b.workspace_size(p); }
  {
    return impl_.workspace_size(forward_params(a, false));
  }

  /// Computes dq, dk, dv (SPEC §Backward) with the selection held fixed: `a.selection` (the forward's
  /// `selected`) or the gate recomputed. Checked like forward; available on backends that implement
  /// it (moba::reference, moba::cpu, moba::cuda), a compile-time error elsewhere.
  void backward(const backward_args<Dtype>& a) {
    using impl = backend_impl<Backend, Dtype>;
    static_assert(requires(impl& b, const core::bwd_params<Dtype>& p) { b.backward(p); },
                  "moba: this backend has no backward pass yet");
    const core::bwd_params<Dtype> p = backward_params(a);
    impl_.check(p);
    impl_.backward(p);
  }

  /// backward with per-call backend options (moba::cuda: the stream and the workspace of this call).
  template <class Impl = backend_impl<Backend, Dtype>>
  void backward(const backward_args<Dtype>& a, const typename Impl::call_options& call) {
    const core::bwd_params<Dtype> p = backward_params(a);
    impl_.check(p, call);
    impl_.backward(p, call);
  }

  /// Bytes of workspace `backward(a)` needs, on backends that can run in caller memory (moba::cuda).
  std::int64_t workspace_size(const backward_args<Dtype>& a) const
    requires requires(const backend_impl<Backend, Dtype>& b, const core::bwd_params<Dtype>& p) { b.workspace_size(p); }
  {
    return impl_.workspace_size(backward_params(a));
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
  core::fwd_params<Dtype> forward_params(const forward_args<Dtype>& a, bool gate_only) const {
    using impl = backend_impl<Backend, Dtype>;
    const core::fwd_params<Dtype> p = detail::make_fwd_params<Dtype>(cfg_, a, gate_only);
    require_head_dim(p.head_dim);
    if constexpr (!requires { impl::device_offsets; }) {
      detail::require(!p.seqs.on_device, impl::name, " reads its offsets on the host: pass cu_seqlens_q/k, not device_seqlens");
    }
    return p;
  }
  core::bwd_params<Dtype> backward_params(const backward_args<Dtype>& a) const {
    const core::bwd_params<Dtype> p = detail::make_bwd_params<Dtype>(cfg_, a);
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
