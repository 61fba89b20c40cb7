// SPDX-License-Identifier: MIT
/// @file Backward conformance (SPEC §Backward), for any backend that has one: dq, dk, dv against the
/// float64 reference's backward on the same inputs and the same selection, the selection passed in
/// equal bit for bit to the gate recomputed, and bad arguments refused before anything is written.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <random>
#include <vector>

#include "support/support.hpp"

namespace moba::test {

template <class T>
struct gradients {
  std::vector<T> dq, dk, dv;
};

/// Backend's backward of `t` for `dout`, from the forward outputs `fwd` (out, lse), with gradients
/// poisoned first. `sel` (width fwd.width) is passed as the selection, or, when null, recomputed.
/// `make` builds the attention object (backend options such as a thread count).
template <class Backend, class T, class Make>
gradients<T> run_backward(const tensors<T>& t, const outputs<T>& fwd, const std::vector<T>& dout,
                          const std::vector<std::int32_t>* sel, Make&& make) {
  gradients<T> g;
  g.dq.assign(t.q.size(), poison_value<T>());
  g.dk.assign(t.k.size(), poison_value<T>());
  g.dv.assign(t.v.size(), poison_value<T>());
  attention<Backend, T> attn = make();
  const std::int64_t tq = t.total_q(), tk = t.total_k(), hq = t.s.hq, hkv = t.s.hkv, d = t.s.d;
  runner<Backend, T>::backward(attn, {.q = t.q_view(),
                 .k = t.k_view(),
                 .v = t.v_view(),
                 .out = packed(fwd.out.data(), tq, hq, d),
                 .dout = packed(dout.data(), tq, hq, d),
                 .lse = bsh(fwd.lse.data(), 1, tq, hq),
                 .dq = packed(g.dq.data(), tq, hq, d),
                 .dk = packed(g.dk.data(), tk, hkv, d),
                 .dv = packed(g.dv.data(), tk, hkv, d),
                 .cu_seqlens_q = t.cu_q,
                 .cu_seqlens_k = t.cu_k,
                 .selection = sel ? selection(sel->data(), 1, tq, hq, fwd.width) : tensor_view<const std::int32_t, 4>{}});
  return g;
}

template <class Backend, class T>
gradients<T> run_backward(const tensors<T>& t, const config& cfg, const outputs<T>& fwd, const std::vector<T>& dout,
                          const std::vector<std::int32_t>* sel) {
  return run_backward<Backend, T>(t, fwd, dout, sel, [&] { return attention<Backend, T>(cfg); });
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
bool same_bits(const gradients<T>& a, const gradients<T>& b) {
  return same_bits(a.dq, b.dq) && same_bits(a.dk, b.dk) && same_bits(a.dv, b.dv);
}

/// One problem: Backend's forward then backward, the latter with its forward's selection passed in
/// and with the gate recomputed (bit for bit the same), against the reference's backward in double
/// on the same inputs and that selection (so that a near-tie the fp32 gate flips cannot matter).
/// `dout_scale` scales the output gradient (2^-128: denormal in float and bfloat16, SPEC §Precision).
template <class Backend, class T>
void expect_backward_matches_reference(const shape& s, const config& cfg, double dout_scale = 1.0) {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  CAPTURE(s.d);
  CAPTURE(cfg.block_size);
  CAPTURE(cfg.top_k);
  CAPTURE(static_cast<int>(cfg.mode));
  CAPTURE(dout_scale);
  const tensors<T> t = random_tensors<T>(s, seed);
  std::mt19937_64 rng(seed + 1);
  const std::vector<T> dout = random_values<T>(t.q.size(), rng, dout_scale);
  const outputs<T> fwd = run<Backend, T>(t, cfg);
  const gradients<T> got = run_backward<Backend, T>(t, cfg, fwd, dout, &fwd.selected);
  CHECK(same_bits(got, run_backward<Backend, T>(t, cfg, fwd, dout, nullptr)));

  const tensors<double> wide = widen(t);
  std::vector<double> wide_dout;
  for (const T& x : dout) wide_dout.push_back(to_double(x));
  outputs<double> exact;
  exact.width = fwd.width;
  exact.out.assign(t.q.size(), poison_value<double>());
  exact.lse.assign(t.total_q() * s.hq, poison_value<double>());
  attention<reference, double> oracle(cfg);
  oracle.forward({.q = wide.q_view(),
                  .k = wide.k_view(),
                  .v = wide.v_view(),
                  .out = packed(exact.out.data(), t.total_q(), s.hq, s.d),
                  .lse = bsh(exact.lse.data(), 1, t.total_q(), s.hq),
                  .cu_seqlens_q = t.cu_q,
                  .cu_seqlens_k = t.cu_k,
                  .selection = selection(fwd.selected.data(), 1, t.total_q(), s.hq, fwd.width)});
  const gradients<double> want = run_backward<reference, double>(wide, cfg, exact, wide_dout, &fwd.selected);
  CHECK(rel_error(got.dq, want.dq) <= gradient_bound<T>());
  CHECK(rel_error(got.dk, want.dk) <= gradient_bound<T>());
  CHECK(rel_error(got.dv, want.dv) <= gradient_bound<T>());
}

/// Varlen with an empty sequence, one shorter than a block, q_len < k_len, and GQA; both modes;
/// each head dim of `dims`.
template <class Backend, class T>
void suite_backward_matches_reference(std::initializer_list<std::int64_t> dims) {
  for (const std::int64_t d : dims)
    for (const auto& [block, top_k] : {std::pair{16, 3}, {64, 2}, {32, 8}, {128, 1}})
      for (const mode m : {mode::sparse, mode::full}) {
        config cfg;
        cfg.block_size = block;
        cfg.top_k = top_k;
        cfg.mode = m;
        expect_backward_matches_reference<Backend, T>({{0, 5, 300, 70}, {0, 5, 300, 200}, 4, 2, d}, cfg);
      }
}

/// Denormal output gradients (every gradient then lies in or near the denormal range): no fast
/// path may flush them (x86's vdpbf16ps would).
template <class Backend, class T>
void expect_backward_denormals() {
  config cfg;
  cfg.block_size = 32;
  cfg.top_k = 3;
  expect_backward_matches_reference<Backend, T>({{200, 70}, {200, 230}, 4, 2, 64}, cfg, std::ldexp(1.0, -128));
}

/// A bad selection entry is refused, naming it.
template <class Backend, class T>
void expect_backward_refuses_bad_selection() {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  const tensors<T> t = random_tensors<T>({{100}, {100}, 2, 1, 16}, seed);
  config cfg;
  cfg.block_size = 16;
  cfg.top_k = 3;
  std::mt19937_64 rng(seed + 1);
  const std::vector<T> dout = random_values<T>(t.q.size(), rng);
  const outputs<T> fwd = run<Backend, T>(t, cfg);
  std::vector<std::int32_t> bad = fwd.selected;
  const std::int64_t row = 90 * t.s.hq;  // token 90 (current block 5) of head 0
  bad[row * fwd.width] = 6;              // a future block
  auto call = [&] { run_backward<Backend, T>(t, cfg, fwd, dout, &bad); };
  CHECK_THROWS_WITH_AS(call(), doctest::Contains("selection(0, 90, 0, 0) = 6"), invalid_argument);
}

}  // namespace moba::test
