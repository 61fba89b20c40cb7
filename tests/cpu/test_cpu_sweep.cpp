// SPDX-License-Identifier: MIT
/// @file moba::cpu against the float64 reference over every dtype × head dim × block size × top-k, and on a
/// 16K-token sequence checked on windows of rows.
#include <doctest/doctest.h>

#include <tuple>
#include <vector>

#include "conformance/forward.hpp"

namespace {

template <class T>
void sweep_case(std::int64_t d, std::int64_t block, std::int64_t top_k) {
  moba::config cfg;
  cfg.block_size = block;
  cfg.top_k = top_k;
  // Long enough for top_k history blocks where that stays cheap for the O(N²) reference; a second,
  // shorter sequence with q_len < k_len exercises varlen and bottom-right alignment.
  const std::int32_t n = static_cast<std::int32_t>(std::min<std::int64_t>(block * (top_k + 2) + 13, 1100));
  moba::test::expect_matches_reference<moba::cpu, T>({{n, 20}, {n, 75}, 4, 2, d}, cfg);
}

}  // namespace

TEST_CASE_TEMPLATE("moba::cpu matches the reference for head dims {64, 80, 128} x blocks {16, 64, 128, 512} x top-k {1, 2, 3, 8}",
                   T, float, moba::bfloat16, moba::float16, double) {
  for (std::int64_t d : {64, 80, 128})
    for (std::int64_t block : {16, 64, 128, 512})
      for (std::int64_t top_k : {1, 2, 3, 8}) sweep_case<T>(d, block, top_k);
}

TEST_CASE_TEMPLATE("moba::cpu on 16K tokens equals the reference on windows of rows", T, float, moba::bfloat16) {
  // Rows [a, a + w) of a prefill equal a call whose queries are those rows and whose keys stop at
  // a + w (bottom-right alignment), which the O(N²) reference can afford.
  const std::int64_t n = 16384, w = 48, hq = 4, hkv = 2, d = 128;
  const std::uint64_t seed = moba::test::fresh_seed();
  CAPTURE(seed);
  const auto full = moba::test::random_tensors<T>({{static_cast<std::int32_t>(n)}, {static_cast<std::int32_t>(n)}, hq, hkv, d}, seed);
  moba::config cfg;
  cfg.block_size = 512;
  cfg.top_k = 3;
  const auto got = moba::test::run<moba::cpu, T>(full, cfg);
  for (std::int64_t a : {std::int64_t{0}, std::int64_t{7000}, n - w}) {
    CAPTURE(a);
    moba::test::tensors<T> window;
    window.s = {{static_cast<std::int32_t>(w)}, {static_cast<std::int32_t>(a + w)}, hq, hkv, d};
    window.cu_q = {0, static_cast<std::int32_t>(w)};
    window.cu_k = {0, static_cast<std::int32_t>(a + w)};
    window.q.assign(full.q.begin() + a * hq * d, full.q.begin() + (a + w) * hq * d);
    window.k.assign(full.k.begin(), full.k.begin() + (a + w) * hkv * d);
    window.v.assign(full.v.begin(), full.v.begin() + (a + w) * hkv * d);
    const auto want = moba::test::run<moba::reference, double>(moba::test::widen(window), cfg);
    moba::test::outputs<T> rows;
    rows.out.assign(got.out.begin() + a * hq * d, got.out.begin() + (a + w) * hq * d);
    rows.lse.assign(got.lse.begin() + a * hq, got.lse.begin() + (a + w) * hq);
    rows.selected.assign(got.selected.begin() + a * hq * 3, got.selected.begin() + (a + w) * hq * 3);
    std::int64_t flips = 0;
    const auto keep = moba::test::agreeing_rows(window, cfg, rows.selected, want.selected, 3, &flips);
    CHECK(flips <= 2);
    CHECK(moba::test::rel_error(rows.out, want.out, d, &keep) <= moba::test::output_bound<T>());
    CHECK(moba::test::rel_error(rows.lse, want.lse, 1, &keep) <= moba::test::output_bound<T>());
  }
}
