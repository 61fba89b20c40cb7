// SPDX-License-Identifier: MIT
/// @file conformance/backward.hpp on moba::cuda (device copies through device_runner.hpp): every
/// gradient against the float64 reference (varlen with empty and short sequences, GQA, q_len < k_len,
/// both modes, head dims 64 and 128), a selection passed in equal bit for bit to the gate recomputed,
/// two calls bit for bit the same, denormal output gradients. (A device selection is not refused entry
/// by entry: test_cuda_embedding.cu covers what it does.)
#include "cuda/device_runner.hpp"
#include "conformance/backward.hpp"

TEST_CASE_TEMPLATE("moba::cuda: backward matches the float64 reference", T, float, moba::float16, moba::bfloat16) {
  moba::test::suite_backward_matches_reference<moba::cuda, T>({64, 128});
}

TEST_CASE_TEMPLATE("moba::cuda: backward of long blocks and many of them", T, float, moba::bfloat16) {
  moba::config cfg;
  cfg.block_size = 4096;
  cfg.top_k = 2;
  moba::test::expect_backward_matches_reference<moba::cuda, T>({{4500}, {4500}, 2, 1, 64}, cfg);
  cfg.block_size = 64;
  cfg.top_k = 16;
  moba::test::expect_backward_matches_reference<moba::cuda, T>({{1200, 300}, {1300, 300}, 4, 2, 64}, cfg);
}

TEST_CASE_TEMPLATE("moba::cuda: backward is deterministic (two calls, bit for bit)", T, float, moba::bfloat16) {
  using namespace moba::test;
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  const tensors<T> t = random_tensors<T>({{900, 300}, {900, 400}, 8, 2, 128}, seed);
  moba::config cfg;
  cfg.block_size = 64;
  cfg.top_k = 4;
  std::mt19937_64 rng(seed + 1);
  const std::vector<T> dout = random_values<T>(t.q.size(), rng);
  const outputs<T> fwd = run<moba::cuda, T>(t, cfg);
  const gradients<T> a = run_backward<moba::cuda, T>(t, cfg, fwd, dout, &fwd.selected);
  CHECK(same_bits(a, run_backward<moba::cuda, T>(t, cfg, fwd, dout, &fwd.selected)));
}

TEST_CASE_TEMPLATE("moba::cuda: backward with denormal output gradients", T, float, moba::bfloat16) {
  moba::test::expect_backward_denormals<moba::cuda, T>();
}
