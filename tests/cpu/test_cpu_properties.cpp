// SPDX-License-Identifier: MIT
/// @file conformance/properties.hpp on moba::cpu: non-finite inputs, huge top_k, denormals.
#include "conformance/properties.hpp"

TEST_CASE_TEMPLATE("moba::cpu: a key or value a query does not attend contributes nothing, inf or NaN", T, double, float,
                   moba::float16, moba::bfloat16) {
  moba::test::suite_nonfinite_contained<moba::cpu, T>();
}

TEST_CASE_TEMPLATE("moba::cpu: top_k of 2^20, 2^40, INT64_MAX is dense attention in ordinary memory", T, double, float,
                   moba::float16, moba::bfloat16) {
  moba::test::expect_huge_top_k_is_dense<moba::cpu, T>();
}

TEST_CASE_TEMPLATE("moba::cpu: denormal inputs are within SPEC's bound of the float64 reference", T, double, float,
                   moba::float16, moba::bfloat16) {
  moba::test::suite_denormals<moba::cpu, T>();
}

TEST_CASE_TEMPLATE("moba::cpu: a selection passed in is attended exactly, its own selected gives its output bit for bit, "
                   "the gate alone writes only the selection, bad entries are refused", T, double, float, moba::float16,
                   moba::bfloat16) {
  moba::test::suite_selection_input<moba::cpu, T>();
}
