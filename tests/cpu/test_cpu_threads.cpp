// SPDX-License-Identifier: MIT
/// @file SPEC §Threads on moba::cpu: calls on one object are serialised, so one object called from
/// several std::threads at once gives what serial calls give, bit for bit. Also run under
/// ThreadSanitizer by scripts/ci/tsan.sh (MOBA_CPU_SERIAL: no oneTBB).
#include "conformance/properties.hpp"

TEST_CASE_TEMPLATE("moba::cpu: one object called from two and four threads at once equals serial calls, bit for bit", T,
                   float, moba::bfloat16) {
  moba::test::expect_concurrent_calls_match_serial<moba::cpu, T>(2, 10);
  moba::test::expect_concurrent_calls_match_serial<moba::cpu, T>(4, 10);
}
