// SPDX-License-Identifier: MIT
/// @file conformance/properties.hpp on moba::cuda (device copies through device_runner.hpp): denormals,
/// a selection passed in and the gate alone. (A device selection is not refused entry by entry but
/// skipped: test_cuda_embedding.cu covers that.) Not here, because moba::cuda does not meet it yet
/// (SPEC §Non-finite inputs; measured on an H200 2026-12-03): non-finite values contained within the
/// current block's causal mask.
#include "cuda/device_runner.hpp"
#include "conformance/properties.hpp"

TEST_CASE_TEMPLATE("moba::cuda: denormal inputs are within SPEC's bound of the float64 reference", T, float,
                   moba::float16, moba::bfloat16) {
  moba::test::suite_denormals<moba::cuda, T>();
}

TEST_CASE_TEMPLATE("moba::cuda: a selection passed in is attended exactly, its own selected gives its output bit for bit, "
                   "the gate alone writes only the selection",
                   T, float, moba::float16, moba::bfloat16) {
  // Its own selected gives its output bit for bit: in sparse mode always, in full mode for float
  // (f16/bf16 full mode attends every block in one pass, a selection passed in block by block).
  moba::test::expect_selection_round_trip<moba::cuda, T>(moba::mode::sparse);
  moba::test::expect_selection_round_trip<moba::cuda, T>(moba::mode::sparse, true);
  if constexpr (std::is_same_v<T, float>) moba::test::expect_selection_round_trip<moba::cuda, T>(moba::mode::full);
  moba::test::expect_given_selection_attended<moba::cuda, T>();
}

