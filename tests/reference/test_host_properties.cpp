// SPDX-License-Identifier: MIT
/// @file conformance/properties.hpp on moba::reference: non-finite inputs, huge top_k, denormals, threads.
#include "conformance/properties.hpp"

TEST_CASE_TEMPLATE("moba::reference: a key or value a query does not attend contributes nothing, inf or NaN", T, double,
                   float, moba::float16, moba::bfloat16) {
  moba::test::suite_nonfinite_contained<moba::reference, T>();
}

TEST_CASE_TEMPLATE("moba::reference: top_k of 2^20, 2^40, INT64_MAX is dense attention in ordinary memory", T, float,
                   moba::bfloat16) {
  moba::test::expect_huge_top_k_is_dense<moba::reference, T>();
}

TEST_CASE_TEMPLATE("moba::reference: denormal inputs are within SPEC's bound of the float64 reference", T, float,
                   moba::float16, moba::bfloat16) {
  moba::test::suite_denormals<moba::reference, T>();
}

TEST_CASE("moba::reference: one object called from four threads at once equals serial calls, bit for bit") {
  moba::test::expect_concurrent_calls_match_serial<moba::reference, float>(4, 3);
}

TEST_CASE_TEMPLATE("moba::reference: a selection passed in is attended exactly, its own selected gives its output bit for bit, "
                   "the gate alone writes only the selection, bad entries are refused", T, double, float, moba::float16,
                   moba::bfloat16) {
  moba::test::suite_selection_input<moba::reference, T>();
}
