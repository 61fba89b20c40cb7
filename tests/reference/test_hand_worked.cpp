// SPDX-License-Identifier: MIT
/// @file A case small enough to work by hand: 8 tokens, block 2, top-k 2, head dim 1.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "support/support.hpp"

TEST_CASE("hand-worked: 8 tokens, block 2, top-k 2; selection, tie rule, output and lse") {
  // q = 1 everywhere, so the gate score of block j is the mean of its keys, and softmax weights are e^k.
  // Keys 1 3 | -1 -1 | 2 2 | 0 4: block means 2, -1, 2, 2.
  const std::vector<double> q(8, 1.0), k{1, 3, -1, -1, 2, 2, 0, 4}, v{1, 2, 3, 4, 5, 6, 7, 8};
  // Query i sits in block c = i / 2. c = 0: {0}. c = 1: only block 0 is eligible: {0, 1}.
  // c = 2: blocks 0 (2) and 1 (-1) eligible: {0, 2}. c = 3: blocks 0 and 2 tie at 2; the lower wins: {0, 3}.
  const std::vector<std::vector<int>> want_selected{{0, -1}, {0, -1}, {0, 1}, {0, 1}, {0, 2}, {0, 2}, {0, 3}, {0, 3}};
  const std::vector<std::vector<int>> keys_seen{{0},          {0, 1},       {0, 1, 2},    {0, 1, 2, 3},
                                                {0, 1, 4},    {0, 1, 4, 5}, {0, 1, 6},    {0, 1, 6, 7}};
  moba::config cfg;
  cfg.block_size = 2;
  cfg.top_k = 2;
  cfg.softmax_scale = 1.0;
  std::vector<double> out(8, NAN), lse(8, NAN);
  std::vector<std::int32_t> selected(16, -7);
  moba::attention<moba::reference, double> attn(cfg);
  attn.forward({.q = moba::packed(q.data(), 8, 1, 1),
                .k = moba::packed(k.data(), 8, 1, 1),
                .v = moba::packed(v.data(), 8, 1, 1),
                .out = moba::packed(out.data(), 8, 1, 1),
                .lse = moba::bsh(lse.data(), 1, 8, 1),
                .selected = moba::selection(selected.data(), 1, 8, 1, 2)});
  for (int i = 0; i < 8; ++i) {
    CAPTURE(i);
    CHECK(selected[2 * i] == want_selected[i][0]);
    CHECK(selected[2 * i + 1] == want_selected[i][1]);
    double num = 0, den = 0;
    for (int t : keys_seen[i]) {
      num += std::exp(k[t]) * v[t];
      den += std::exp(k[t]);
    }
    CHECK(out[i] == doctest::Approx(num / den).epsilon(1e-14));
    CHECK(lse[i] == doctest::Approx(std::log(den)).epsilon(1e-14));
  }
  // Spelled out for query 7: keys 0, 1, 6, 7 with logits 1, 3, 0, 4.
  CHECK(out[7] == doctest::Approx((std::exp(1) * 1 + std::exp(3) * 2 + std::exp(0) * 7 + std::exp(4) * 8) /
                                  (std::exp(1) + std::exp(3) + std::exp(0) + std::exp(4))));
}
