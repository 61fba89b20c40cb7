// SPDX-License-Identifier: MIT
/// @file moba::cpu against the float64 reference over every dtype × head dim × block size × top-k, and on a
/// 16K-token sequence, forward and backward, checked on windows of rows.
#include <doctest/doctest.h>

#include <tuple>
#include <vector>

#include "conformance/backward.hpp"
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

TEST_CASE_TEMPLATE("moba::cpu backward matches the reference (head dims 64, 128, varlen, GQA, q_len < k_len, both modes)",
                   T, double, float, moba::bfloat16, moba::float16) {
  moba::test::suite_backward_matches_reference<moba::cpu, T>({64, 128});
}

TEST_CASE_TEMPLATE("moba::cpu backward on 16K tokens equals the reference on windows of rows and the last block's keys",
                   T, float, moba::bfloat16) {
  // Query rows [a, a + w) of a prefill, with keys [0, a + w), are a call of their own (bottom-right
  // alignment) given their selection: the reference can afford it, and it gives those rows' dq and,
  // for the last block, that block's dk and dv whole (no later query attends them).
  const std::int64_t n = 16384, hq = 4, hkv = 2, d = 128, block = 512;
  const std::uint64_t seed = moba::test::replayable_seed();
  CAPTURE(seed);
  const auto full = moba::test::random_tensors<T>({{static_cast<std::int32_t>(n)}, {static_cast<std::int32_t>(n)}, hq, hkv, d}, seed);
  std::mt19937_64 rng(seed + 1);
  const std::vector<T> dout = moba::test::random_values<T>(full.q.size(), rng);
  moba::config cfg;
  cfg.block_size = block;
  cfg.top_k = 3;
  const auto fwd = moba::test::run<moba::cpu, T>(full, cfg);
  const auto got = moba::test::run_backward<moba::cpu, T>(full, cfg, fwd, dout, nullptr);
  for (const auto& [a, w] : {std::pair<std::int64_t, std::int64_t>{7000, 48}, {n - block, block}}) {
    CAPTURE(a);
    const std::int64_t e = a + w;
    moba::test::tensors<double> window;
    window.s = {{static_cast<std::int32_t>(w)}, {static_cast<std::int32_t>(e)}, hq, hkv, d};
    window.cu_q = {0, static_cast<std::int32_t>(w)};
    window.cu_k = {0, static_cast<std::int32_t>(e)};
    for (std::int64_t x = a * hq * d; x < e * hq * d; ++x) window.q.push_back(moba::to_double(full.q[x]));
    for (std::int64_t x = 0; x < e * hkv * d; ++x) window.k.push_back(moba::to_double(full.k[x]));
    for (std::int64_t x = 0; x < e * hkv * d; ++x) window.v.push_back(moba::to_double(full.v[x]));
    std::vector<double> window_dout;
    for (std::int64_t x = a * hq * d; x < e * hq * d; ++x) window_dout.push_back(moba::to_double(dout[x]));
    moba::test::outputs<double> exact;
    exact.width = fwd.width;
    exact.selected.assign(fwd.selected.begin() + a * hq * fwd.width, fwd.selected.begin() + e * hq * fwd.width);
    exact.out.assign(window.q.size(), NAN);
    exact.lse.assign(w * hq, NAN);
    moba::attention<moba::reference, double> oracle(cfg);
    oracle.forward({.q = window.q_view(),
                    .k = window.k_view(),
                    .v = window.v_view(),
                    .out = moba::packed(exact.out.data(), w, hq, d),
                    .lse = moba::bsh(exact.lse.data(), 1, w, hq),
                    .cu_seqlens_q = window.cu_q,
                    .cu_seqlens_k = window.cu_k,
                    .selection = moba::selection<const std::int32_t>(exact.selected.data(), 1, w, hq, exact.width)});
    const auto want = moba::test::run_backward<moba::reference, double>(window, cfg, exact, window_dout, &exact.selected);
    const std::vector<T> dq_rows(got.dq.begin() + a * hq * d, got.dq.begin() + e * hq * d);
    CHECK(moba::test::rel_error(dq_rows, want.dq) <= moba::test::gradient_bound<T>());
    if (e == n) {
      const std::vector<T> dk_rows(got.dk.begin() + a * hkv * d, got.dk.end()), dv_rows(got.dv.begin() + a * hkv * d, got.dv.end());
      const std::vector<double> dk_want(want.dk.begin() + a * hkv * d, want.dk.end()), dv_want(want.dv.begin() + a * hkv * d, want.dv.end());
      CHECK(moba::test::rel_error(dk_rows, dk_want) <= moba::test::gradient_bound<T>());
      CHECK(moba::test::rel_error(dv_rows, dv_want) <= moba::test::gradient_bound<T>());
    }
  }
  // Every key at once: each query's weights sum to 1, so Σ_t dv_t = Σ over the kv head's queries of dout.
  std::vector<double> dv_sum(hkv * d, 0), dout_sum(hkv * d, 0);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t x = 0; x < hkv * d; ++x) dv_sum[x] += moba::to_double(got.dv[t * hkv * d + x]);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t x = 0; x < d; ++x) dout_sum[h / (hq / hkv) * d + x] += moba::to_double(dout[(t * hq + h) * d + x]);
  CHECK(moba::test::rel_error(dv_sum, dout_sum) <= moba::test::gradient_bound<T>());
}
