// SPDX-License-Identifier: MIT
/// @file moba::reference backward: gradients equal central finite differences of the forward pass.
#include <doctest/doctest.h>

#include <vector>

#include "support/support.hpp"

namespace {

using moba::test::tensors;

/// L = Σ dout ∘ out: its gradients are what backward computes for that dout.
double loss(const tensors<double>& t, const moba::config& cfg, const std::vector<double>& dout) {
  const auto o = moba::test::run<moba::reference, double>(t, cfg);
  double l = 0;
  for (std::size_t i = 0; i < dout.size(); ++i) l += dout[i] * o.out[i];
  return l;
}

}  // namespace

TEST_CASE("reference backward equals finite differences (varlen, GQA, q_len < k_len, both modes)") {
  const std::uint64_t seed = moba::test::fresh_seed();
  CAPTURE(seed);
  tensors<double> t = moba::test::random_tensors<double>({{7, 0, 5}, {11, 3, 5}, 4, 2, 6}, seed);
  std::mt19937_64 rng(seed + 1);
  const std::vector<double> dout = moba::test::random_values<double>(t.q.size(), rng);
  moba::config cfg;
  cfg.block_size = 3;
  cfg.top_k = 2;
  SUBCASE("sparse") {}
  SUBCASE("full") { cfg.mode = moba::mode::full; }

  const auto fwd = moba::test::run<moba::reference, double>(t, cfg);
  std::vector<double> dq(t.q.size(), NAN), dk(t.k.size(), NAN), dv(t.v.size(), NAN);
  moba::attention<moba::reference, double> attn(cfg);
  attn.backward({.q = t.q_view(),
                 .k = t.k_view(),
                 .v = t.v_view(),
                 .out = moba::packed(fwd.out.data(), t.total_q(), 4, 6),
                 .dout = moba::packed(dout.data(), t.total_q(), 4, 6),
                 .lse = moba::bsh(fwd.lse.data(), 1, t.total_q(), 4),
                 .dq = moba::packed(dq.data(), t.total_q(), 4, 6),
                 .dk = moba::packed(dk.data(), t.total_k(), 2, 6),
                 .dv = moba::packed(dv.data(), t.total_k(), 2, 6),
                 .cu_seqlens_q = t.cu_q,
                 .cu_seqlens_k = t.cu_k});

  // A step this small cannot move a gate score across a gap on random inputs, so the selection
  // stays fixed, as SPEC §Backward requires.
  const double h = 1e-6;
  for (auto [input, grad] : {std::pair{&t.q, &dq}, {&t.k, &dk}, {&t.v, &dv}}) {
    std::vector<double> numeric(input->size());
    for (std::size_t i = 0; i < input->size(); ++i) {
      const double x = (*input)[i];
      (*input)[i] = x + h;
      const double up = loss(t, cfg, dout);
      (*input)[i] = x - h;
      const double down = loss(t, cfg, dout);
      (*input)[i] = x;
      numeric[i] = (up - down) / (2 * h);
    }
    CHECK(moba::test::rel_error(*grad, numeric) <= 1e-7);
  }
}

TEST_CASE("backward rejects a gradient that overlaps an input, before writing") {
  tensors<double> t = moba::test::random_tensors<double>({{8}, {8}, 2, 1, 4}, moba::test::fresh_seed());
  moba::config cfg;
  cfg.block_size = 4;
  cfg.top_k = 2;
  const auto fwd = moba::test::run<moba::reference, double>(t, cfg);
  std::vector<double> dq(t.q.size(), NAN), dv(t.v.size(), NAN);
  moba::attention<moba::reference, double> attn(cfg);
  CHECK_THROWS_WITH_AS(attn.backward({.q = t.q_view(),
                                      .k = t.k_view(),
                                      .v = t.v_view(),
                                      .out = moba::packed(fwd.out.data(), 8, 2, 4),
                                      .dout = moba::packed(fwd.out.data(), 8, 2, 4),
                                      .lse = moba::bsh(fwd.lse.data(), 1, 8, 2),
                                      .dq = moba::packed(dq.data(), 8, 2, 4),
                                      .dk = moba::packed(const_cast<double*>(t.k.data()), 8, 1, 4),
                                      .dv = moba::packed(dv.data(), 8, 1, 4),
                                      .cu_seqlens_q = t.cu_q,
                                      .cu_seqlens_k = t.cu_k}),
                       "moba: output dk overlaps input k", std::invalid_argument);
  for (double x : dq) CHECK(std::isnan(x));
}
