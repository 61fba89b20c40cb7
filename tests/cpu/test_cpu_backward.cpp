// SPDX-License-Identifier: MIT
/// @file moba::cpu backward: gradients against the float64 reference, the selection passed in or
/// recomputed, and the same bits whatever the thread count.
#include <doctest/doctest.h>

#include "conformance/backward.hpp"

// Head dims 16 and 80 here (also under the sanitizers); 64 and 128 in test_cpu_sweep.cpp.
TEST_CASE_TEMPLATE("moba::cpu backward matches the reference (head dims 16, 80, varlen, GQA, q_len < k_len, both modes)",
                   T, double, float, moba::bfloat16, moba::float16) {
  moba::test::suite_backward_matches_reference<moba::cpu, T>({16, 80});
}

TEST_CASE_TEMPLATE("moba::cpu backward: denormal output gradients are within SPEC's bound", T, float, moba::bfloat16) {
  moba::test::expect_backward_denormals<moba::cpu, T>();
}

TEST_CASE_TEMPLATE("moba::cpu backward refuses a bad selection", T, float, moba::bfloat16) {
  moba::test::expect_backward_refuses_bad_selection<moba::cpu, T>();
}

TEST_CASE_TEMPLATE("moba::cpu backward gives the same bits on 1, 2 and 8 threads", T, float, moba::bfloat16) {
  const std::uint64_t seed = moba::test::replayable_seed();
  CAPTURE(seed);
  const auto t = moba::test::random_tensors<T>({{1500, 0, 700}, {1500, 0, 1300}, 4, 2, 64}, seed);
  std::mt19937_64 rng(seed + 1);
  const std::vector<T> dout = moba::test::random_values<T>(t.q.size(), rng);
  for (const moba::mode m : {moba::mode::sparse, moba::mode::full}) {
    CAPTURE(static_cast<int>(m));
    moba::config cfg;
    cfg.block_size = 64;
    cfg.top_k = 3;
    cfg.mode = m;
    const auto fwd = moba::test::run<moba::cpu, T>(t, cfg);
    auto on = [&](int threads) {
      return moba::test::run_backward<moba::cpu, T>(t, fwd, dout, nullptr, [&] {
        return moba::attention<moba::cpu, T>(cfg, moba::backends::cpu::options{threads});
      });
    };
    const auto one = on(1);
    CHECK(moba::test::same_bits(one, on(2)));
    CHECK(moba::test::same_bits(one, on(8)));
  }
}
