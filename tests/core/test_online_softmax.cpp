// SPDX-License-Identifier: MIT
/// @file Merging two softmax parts by lse equals the softmax over their union (SPEC §Attention).
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include <moba/core/online_softmax.hpp>

namespace {
double lse_of(const std::vector<double>& x) {
  double m = -INFINITY, s = 0;
  for (double v : x) m = std::max(m, v);
  for (double v : x) s += std::exp(v - m);
  return x.empty() ? -INFINITY : m + std::log(s);
}
}  // namespace

TEST_CASE("merging two parts by lse equals one softmax over both") {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<double> normal(0, 5);
  for (int trial = 0; trial < 100; ++trial) {
    const int n1 = trial % 4, n2 = 1 + trial % 7;  // part 1 may be empty
    std::vector<double> a(n1), b(n2), va(n1), vb(n2);
    for (auto* x : {&a, &b, &va, &vb}) for (auto& e : *x) e = normal(rng);
    const double l1 = lse_of(a), l2 = lse_of(b);
    double o1 = 0, o2 = 0, direct = 0;
    for (int i = 0; i < n1; ++i) o1 += std::exp(a[i] - l1) * va[i];
    for (int i = 0; i < n2; ++i) o2 += std::exp(b[i] - l2) * vb[i];
    std::vector<double> all = a;
    all.insert(all.end(), b.begin(), b.end());
    const double l = moba::core::merge_lse(l1, l2);
    for (int i = 0; i < n1; ++i) direct += std::exp(a[i] - lse_of(all)) * va[i];
    for (int i = 0; i < n2; ++i) direct += std::exp(b[i] - lse_of(all)) * vb[i];
    CHECK(l == doctest::Approx(lse_of(all)).epsilon(1e-14));
    const double merged = o1 * moba::core::part_weight(l1, l) + o2 * moba::core::part_weight(l2, l);
    CHECK(merged == doctest::Approx(direct).epsilon(1e-12));
  }
  CHECK(moba::core::merge_lse(-HUGE_VAL, -HUGE_VAL) == -HUGE_VAL);
  CHECK(moba::core::part_weight(-HUGE_VAL, 3.0) == 0.0);
}

TEST_CASE("the log2 form of the merge is the natural one in other units, and keeps an empty part's weight 0") {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> u(-50, 50);
  for (int n = 0; n < 1000; ++n) {
    const double a = u(rng), b = u(rng), ln2 = std::log(2.0);
    CHECK(moba::core::merge_lse2(a / ln2, b / ln2) * ln2 == doctest::Approx(moba::core::merge_lse(a, b)).epsilon(1e-12));
  }
  CHECK(moba::core::merge_lse2(-INFINITY, 3.5f) == 3.5f);  // float, as kernels call it
  CHECK(moba::core::merge_lse2(2.0, -double(INFINITY)) == 2.0);
  CHECK(moba::core::merge_lse2(-INFINITY, -INFINITY) == -INFINITY);  // float
}
