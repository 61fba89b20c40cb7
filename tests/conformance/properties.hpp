// SPDX-License-Identifier: MIT
/// @file Properties beyond the forward conformance suite, instantiated by tests/reference,
/// tests/cpu and (through device_runner.hpp, where they apply) tests/cuda: non-finite inputs stay behind the
/// causal mask and the selection (SPEC §Non-finite inputs), top_k far above the blocks, denormal
/// inputs (SPEC §Precision), concurrent calls on one object (SPEC §Threads) and a selection passed
/// in or the gate alone (SPEC §Blocks 7). Random inputs are fresh each run; a failure prints its seed,
/// and MOBA_TEST_SEED=<seed> replays it.
#pragma once

#include <doctest/doctest.h>

#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "support/support.hpp"

namespace moba::test {

/// Poisoned outputs of a call, with a selection view `width` entries wide (0: none).
template <class T>
outputs<T> poisoned_outputs(const tensors<T>& t, std::int64_t width) {
  outputs<T> o;
  o.width = width;
  o.out.assign(t.total_q() * t.s.hq * t.s.d, poison_value<T>());
  o.lse.assign(t.total_q() * t.s.hq, poison_value<accum_t<T>>());
  o.selected.assign(t.total_q() * t.s.hq * width, poison_value<std::int32_t>());
  return o;
}

template <class T>
forward_args<T> args_of(const tensors<T>& t, outputs<T>& o) {
  return {.q = t.q_view(),
          .k = t.k_view(),
          .v = t.v_view(),
          .out = packed(o.out.data(), t.total_q(), t.s.hq, t.s.d),
          .lse = bsh(o.lse.data(), 1, t.total_q(), t.s.hq),
          .selected = o.width ? selection(o.selected.data(), 1, t.total_q(), t.s.hq, o.width) : tensor_view<std::int32_t, 4>{},
          .cu_seqlens_q = t.cu_q,
          .cu_seqlens_k = t.cu_k};
}

/// Blocks of the longest sequence of `t`: the widest selection any query can have.
template <class T>
std::int64_t max_blocks(const tensors<T>& t, std::int64_t block_size) {
  std::int64_t n = 0;
  for (auto len : t.s.k_lens) n = std::max(n, core::block_count(len, block_size));
  return n;
}

/// Runs Backend on `t` with poisoned outputs and a selection view `width` entries wide.
template <class Backend, class T>
outputs<T> run_width(const tensors<T>& t, const config& cfg, std::int64_t width) {
  outputs<T> o = poisoned_outputs(t, width);
  attention<Backend, T> attn(cfg);
  runner<Backend, T>::forward(attn, args_of(t, o));
  return o;
}

/// Whether row `row`'s selection (width entries) holds block j.
inline bool selects(const std::vector<std::int32_t>& selected, std::int64_t width, std::int64_t row, std::int64_t j) {
  const auto at = selected.begin() + row * width;
  return std::find(at, at + width, static_cast<std::int32_t>(j)) != at + width;
}

// ---- SPEC §Non-finite inputs ------------------------------------------------------------------

/// Token `at` of every sequence (kv head b % Hkv of sequence b) holds `value` in one element of its key
/// (`in_key`) or in its whole value row. A query that does not attend that token must get what it gets
/// with the original finite row (where its selection is unchanged), and what the reference gets on the
/// poisoned inputs, finite, within SPEC's bound. The token sits 37 keys into block 2 (B = 64), so the
/// queries before it in its block share its CPU tile and key chunk and mask it.
/// A small head dim the backend supports (moba::cuda has 64 and 128 only): small problems everywhere.
template <class Backend, class T>
std::int64_t small_head_dim() {
  return backend_impl<Backend, T>::supports_head_dim(32) ? 32 : 64;
}

template <class Backend, class T>
void expect_nonfinite_contained(bool in_key, double value, const config& cfg) {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  CAPTURE(in_key);
  CAPTURE(value);
  CAPTURE(cfg.top_k);
  CAPTURE(static_cast<int>(cfg.mode));
  const shape s{{300, 250}, {300, 300}, 4, 2, small_head_dim<Backend, T>()};
  const std::int64_t at = 165, poisoned_block = at / cfg.block_size, group = s.hq / s.hkv;
  const tensors<T> clean = random_tensors<T>(s, seed);
  tensors<T> t = clean;
  std::mt19937_64 rng(seed + 1);
  for (std::size_t b = 0; b < s.k_lens.size(); ++b) {
    const std::int64_t row = (t.cu_k[b] + at) * s.hkv + static_cast<std::int64_t>(b) % s.hkv;
    if (in_key) {
      t.k[row * s.d + static_cast<std::int64_t>(rng() % s.d)] = from_double<T>(value);
    } else {
      for (std::int64_t e = 0; e < s.d; ++e) t.v[row * s.d + e] = from_double<T>(value);
    }
  }
  const std::int64_t width = max_blocks(t, cfg.block_size);
  const outputs<T> got = run_width<Backend, T>(t, cfg, width);
  const outputs<double> want = run_width<reference, double>(widen(t), cfg, width);
  const outputs<double> want_clean = run_width<reference, double>(widen(clean), cfg, width);

  std::int64_t flips = 0;
  std::vector<bool> keep = agreeing_rows(t, cfg, got.selected, want.selected, width, &flips);
  std::vector<bool> keep_clean(keep.size(), false);
  std::int64_t spared = 0;  // rows of a poisoned kv head that do not attend the token: where a leak shows
  for (std::size_t b = 0; b + 1 < t.cu_q.size(); ++b) {
    const std::int64_t q_len = t.cu_q[b + 1] - t.cu_q[b], k_len = t.cu_k[b + 1] - t.cu_k[b];
    for (std::int64_t i = 0; i < q_len; ++i) {
      for (std::int64_t h = 0; h < s.hq; ++h) {
        const std::int64_t row = (t.cu_q[b] + i) * s.hq + h;
        const bool poisoned_head = h / group == static_cast<std::int64_t>(b) % s.hkv;
        const bool attends = poisoned_head && k_len - q_len + i >= at && selects(want.selected, width, row, poisoned_block);
        if (attends) {
          keep[row] = false;
          continue;
        }
        const auto g = got.selected.begin() + row * width;
        keep_clean[row] = std::equal(g, g + width, want_clean.selected.begin() + row * width);
        spared += poisoned_head && keep_clean[row];
      }
    }
  }
  CHECK(spared >= 200);
  CHECK(flips * 100 <= static_cast<std::int64_t>(keep.size()));
  CHECK(rel_error(got.out, want_clean.out, s.d, &keep_clean) <= output_bound<T>());
  CHECK(rel_error(got.lse, want_clean.lse, 1, &keep_clean) <= output_bound<T>());
  if constexpr (!(std::is_same_v<Backend, reference> && std::is_same_v<T, double>)) {  // else: itself
    CHECK(rel_error(got.out, want.out, s.d, &keep) <= output_bound<T>());
    CHECK(rel_error(got.lse, want.lse, 1, &keep) <= output_bound<T>());
  }
}

template <class Backend, class T>
void suite_nonfinite_contained() {
  for (const bool in_key : {true, false}) {
    for (const double value : {INFINITY, -INFINITY, NAN}) {
      for (const auto& [top_k, m] : {std::pair{3, mode::sparse}, {1, mode::sparse}, {3, mode::full}}) {
        config cfg;
        cfg.block_size = 64;
        cfg.top_k = top_k;
        cfg.mode = m;
        expect_nonfinite_contained<Backend, T>(in_key, value, cfg);
      }
    }
  }
}

// ---- top_k far above the blocks (SPEC §Blocks 5: top_k >= blocks means dense) -----------------

inline long peak_rss_kib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;
}

/// top_k = 2^20, 2^40 and INT64_MAX on a 300-token sequence: dense causal attention, every block
/// selected, with a selection view only as wide as the blocks, and no memory sized by top_k.
template <class Backend, class T>
void expect_huge_top_k_is_dense() {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  const tensors<T> t = random_tensors<T>({{300}, {300}, 2, 1, 32}, seed);
  std::vector<double> dense_out, dense_lse;
  dense_causal(widen(t), 1.0 / std::sqrt(32.0), dense_out, dense_lse);
  for (const std::int64_t top_k :
       {std::int64_t{1} << 20, std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::max()}) {
    CAPTURE(top_k);
    config cfg;
    cfg.block_size = 16;
    cfg.top_k = top_k;
    const std::int64_t width = max_blocks(t, cfg.block_size), before = peak_rss_kib();
    const outputs<T> got = run_width<Backend, T>(t, cfg, width);
    CHECK(peak_rss_kib() - before < 256 * 1024);  // the selection of 600 rows is 46 KB; 2^20 entries each was 5 GB
    CHECK(rel_error(got.out, dense_out) <= output_bound<T>());
    CHECK(rel_error(got.lse, dense_lse) <= output_bound<T>());
    std::int64_t wrong = 0;  // entries other than blocks 0..c, then -1
    for (std::int64_t row = 0; row < 600; ++row)
      for (std::int64_t w = 0; w < width; ++w) wrong += got.selected[row * width + w] != (w <= (row / 2) / 16 ? w : -1);
    CHECK(wrong == 0);
  }
}

// ---- SPEC §Precision below the normal range --------------------------------------------------

template <class T>
constexpr int fraction_bits() {
  return std::is_same_v<T, double> ? 52 : std::is_same_v<T, float> ? 23 : std::is_same_v<T, float16> ? 10 : 7;
}

/// ±k·δ for a random k in [1, 2^bits): a denormal of T (bits <= its fraction bits).
template <class T>
T random_denormal(std::mt19937_64& rng, int bits = fraction_bits<T>()) {
  const double k = static_cast<double>(1 + rng() % ((std::uint64_t{1} << bits) - 1));
  return from_double<T>((rng() & 1 ? k : -k) * denormal_spacing<T>());
}

enum class denormals { everywhere, bottom, values_only, mixed };

/// Denormal inputs are numbers like any other: against the float64 reference on the same inputs
/// within SPEC's bound (relative plus one denormal spacing per element), both modes. `everywhere`:
/// every q, k, v element denormal (scores underflow, outputs are denormals); `bottom`: likewise, each
/// at most 15 spacings (outputs of a few bits, where rounding to T costs most); `values_only`: v denormal
/// under normal q and k (outputs are denormals with uneven weights); `mixed`: each element of q, k, v
/// denormal with probability 1/2.
template <class Backend, class T>
void expect_denormals_within_bound(denormals where) {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  CAPTURE(static_cast<int>(where));
  const shape s{{300, 120}, {300, 260}, 4, 2, 64};
  tensors<T> t = random_tensors<T>(s, seed);
  std::mt19937_64 rng(seed + 1);
  for (auto* x : {&t.q, &t.k, &t.v})
    for (T& e : *x)
      if (where == denormals::everywhere || (where == denormals::values_only && x == &t.v) ||
          (where == denormals::mixed && (rng() & 1)))
        e = random_denormal<T>(rng);
      else if (where == denormals::bottom)
        e = random_denormal<T>(rng, 4);
  for (const mode m : {mode::sparse, mode::full}) {
    config cfg;
    cfg.block_size = 64;
    cfg.top_k = 3;
    cfg.mode = m;
    CAPTURE(static_cast<int>(m));
    const std::int64_t width = max_blocks(t, cfg.block_size);
    const outputs<T> got = run_width<Backend, T>(t, cfg, width);
    const outputs<double> want = run_width<reference, double>(widen(t), cfg, width);
    std::int64_t flips = 0, tiny = 0;
    const std::vector<bool> keep = agreeing_rows(t, cfg, got.selected, want.selected, width, &flips);
    if (where == denormals::values_only || where == denormals::mixed) CHECK(flips * 100 <= static_cast<std::int64_t>(keep.size()));
    for (double x : want.out) tiny += std::abs(x) < std::ldexp(denormal_spacing<T>(), fraction_bits<T>());
    if (where != denormals::mixed) CHECK(tiny * 2 > static_cast<std::int64_t>(want.out.size()));  // outputs are denormals
    CHECK(rel_error(got.out, want.out, s.d, &keep) <= output_bound<T>());
    CHECK(rel_error(got.lse, want.lse, 1, &keep) <= output_bound<T>());
  }
}

template <class Backend, class T>
void suite_denormals() {
  for (const denormals where : {denormals::everywhere, denormals::bottom, denormals::values_only, denormals::mixed})
    expect_denormals_within_bound<Backend, T>(where);
}

// ---- SPEC §Threads ---------------------------------------------------------------------------

/// One object called from `threads` std::threads at once, each with its own inputs (of different
/// lengths, so that scratch sizes differ) and outputs, `rounds` times: every call gives, bit for bit,
/// what a serial call of the same object gave.
template <class Backend, class T>
void expect_concurrent_calls_match_serial(int threads, int rounds) {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  config cfg;
  cfg.block_size = 32;
  cfg.top_k = 3;
  attention<Backend, T> attn(cfg);
  std::vector<tensors<T>> inputs;
  std::vector<outputs<T>> serial;
  for (int x = 0; x < threads; ++x) {
    const std::int32_t n = 150 + 61 * x;
    inputs.push_back(random_tensors<T>({{n, 40 + x}, {n, 90 + 7 * x}, 4, 2, 32}, seed + x));
    serial.push_back(poisoned_outputs(inputs.back(), max_blocks(inputs.back(), cfg.block_size)));
    attn.forward(args_of(inputs.back(), serial.back()));
    REQUIRE(std::all_of(serial.back().out.begin(), serial.back().out.end(), [](T e) { return std::isfinite(to_double(e)); }));
  }
  auto same_bits = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
  };
  std::int64_t mismatches = 0;
  for (int round = 0; round < rounds; ++round) {
    std::vector<outputs<T>> got;
    for (int x = 0; x < threads; ++x) got.push_back(poisoned_outputs(inputs[x], serial[x].width));
    std::vector<std::thread> pool;
    for (int x = 0; x < threads; ++x)
      pool.emplace_back([&, x] {
        for (int call = 0; call < 3; ++call) attn.forward(args_of(inputs[x], got[x]));
      });
    for (auto& th : pool) th.join();
    for (int x = 0; x < threads; ++x)
      mismatches += !same_bits(got[x].out, serial[x].out) || !same_bits(got[x].lse, serial[x].lse) ||
                    !same_bits(got[x].selected, serial[x].selected);
  }
  CHECK(mismatches == 0);
}

// ---- SPEC §Blocks 7: a selection passed in, and the gate alone -------------------------------

/// Two sequences (one with q_len < k_len), GQA, B = 32: enough blocks for selections to differ.
template <class Backend, class T>
tensors<T> selection_problem(std::uint64_t seed) {
  return random_tensors<T>({{200, 70}, {200, 230}, 4, 2, small_head_dim<Backend, T>()}, seed);
}

/// A valid selection `width` wide for every query and head of `t`: a random subset of the query's
/// history blocks (each kept with probability `keep`), then its current block, ascending, then -1.
template <class T>
std::vector<std::int32_t> random_selection(const tensors<T>& t, std::int64_t block_size, std::int64_t width,
                                           double keep, std::mt19937_64& rng) {
  std::vector<std::int32_t> sel(t.total_q() * t.s.hq * width, -1);
  std::bernoulli_distribution take(keep);
  for (std::size_t b = 0; b + 1 < t.cu_q.size(); ++b) {
    const std::int64_t q_len = t.cu_q[b + 1] - t.cu_q[b], k_len = t.cu_k[b + 1] - t.cu_k[b];
    for (std::int64_t i = 0; i < q_len; ++i)
      for (std::int64_t h = 0; h < t.s.hq; ++h) {
        std::int32_t* row = sel.data() + ((t.cu_q[b] + i) * t.s.hq + h) * width;
        const std::int64_t c = core::current_block(k_len - q_len + i, block_size);
        std::int64_t n = 0;
        for (std::int64_t j = 0; j < c; ++j)
          if (take(rng)) row[n++] = static_cast<std::int32_t>(j);
        row[n] = static_cast<std::int32_t>(c);
      }
  }
  return sel;
}

/// Runs Backend with `sel` as its selection input, outputs poisoned.
template <class Backend, class T>
outputs<T> run_given(const tensors<T>& t, const config& cfg, const std::vector<std::int32_t>& sel, std::int64_t width) {
  outputs<T> o = poisoned_outputs(t, 0);
  forward_args<T> a = args_of(t, o);
  a.selection = selection(sel.data(), 1, t.total_q(), t.s.hq, width);
  attention<Backend, T> attn(cfg);
  runner<Backend, T>::forward(attn, a);
  return o;
}

/// A call's own `selected` passed back gives that call's out and lse bit for bit; the gate alone
/// (no out, no lse) writes that same selection.
template <class Backend, class T>
void expect_selection_round_trip(mode m, bool at_top_k = false) {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  CAPTURE(static_cast<int>(m));
  CAPTURE(at_top_k);
  const tensors<T> t = selection_problem<Backend, T>(seed);
  config cfg;
  cfg.block_size = 32;
  cfg.top_k = 3;
  cfg.mode = m;
  // The selection as wide as the longest sequence's blocks, or (sparse) as wide as top_k.
  const std::int64_t width = at_top_k ? cfg.top_k : max_blocks(t, cfg.block_size);
  const outputs<T> first = run_width<Backend, T>(t, cfg, width);
  REQUIRE(std::none_of(first.selected.begin(), first.selected.end(), [](std::int32_t j) { return j < -1; }));
  config other = cfg;  // top_k and mode do not apply to a selection passed in
  other.top_k = 1;
  other.mode = mode::sparse;
  const outputs<T> again = run_given<Backend, T>(t, other, first.selected, width);
  CHECK(std::memcmp(again.out.data(), first.out.data(), first.out.size() * sizeof(T)) == 0);
  CHECK(std::memcmp(again.lse.data(), first.lse.data(), first.lse.size() * sizeof(first.lse[0])) == 0);

  outputs<T> gated = poisoned_outputs(t, width);
  forward_args<T> a = args_of(t, gated);
  a.out = {};
  a.lse = {};
  attention<Backend, T> attn(cfg);
  runner<Backend, T>::gate(attn, a);
  CHECK(gated.selected == first.selected);
}

/// A hand-made selection, unrelated to the gate: the backend attends exactly those blocks, within
/// SPEC's bound of the float64 reference given the same selection; with every block selected, of
/// dense causal attention computed independently of the library.
template <class Backend, class T>
void expect_given_selection_attended() {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  const tensors<T> t = selection_problem<Backend, T>(seed);
  config cfg;
  cfg.block_size = 32;
  cfg.top_k = 2;
  const std::int64_t width = max_blocks(t, cfg.block_size) + 1;  // wider than needed: -1 padding
  std::mt19937_64 rng(seed + 2);
  const std::vector<std::int32_t> sel = random_selection(t, cfg.block_size, width, 0.5, rng);
  const outputs<T> got = run_given<Backend, T>(t, cfg, sel, width);
  if constexpr (!(std::is_same_v<Backend, reference> && std::is_same_v<T, double>)) {  // else: itself
    const outputs<double> want = run_given<reference, double>(widen(t), cfg, sel, width);
    CHECK(rel_error(got.out, want.out) <= output_bound<T>());
    CHECK(rel_error(got.lse, want.lse) <= output_bound<T>());
  }
  const outputs<T> all = run_given<Backend, T>(t, cfg, random_selection(t, cfg.block_size, width, 1.0, rng), width);
  std::vector<double> dense_out, dense_lse;
  dense_causal(widen(t), 1.0 / std::sqrt(static_cast<double>(t.s.d)), dense_out, dense_lse);
  CHECK(rel_error(all.out, dense_out) <= output_bound<T>());
  CHECK(rel_error(all.lse, dense_lse) <= output_bound<T>());
}

/// Every kind of bad entry, at a random query and head, is refused naming the entry, before anything
/// is written.
template <class Backend, class T>
void expect_bad_selection_refused() {
  const std::uint64_t seed = replayable_seed();
  CAPTURE(seed);
  const tensors<T> t = selection_problem<Backend, T>(seed);
  config cfg;
  cfg.block_size = 32;
  const std::int64_t width = max_blocks(t, cfg.block_size) + 1;
  std::mt19937_64 rng(seed + 3);
  const std::vector<std::int32_t> good = random_selection(t, cfg.block_size, width, 0.5, rng);
  REQUIRE_NOTHROW(run_given<Backend, T>(t, cfg, good, width));
  // A row of the second sequence, token 40 (pos 200, current block 6): at least 2 history blocks.
  const std::int64_t row = (t.cu_q[1] + 40) * t.s.hq + static_cast<std::int64_t>(rng() % t.s.hq);
  auto count_of = [&](const std::vector<std::int32_t>& sel) {
    std::int64_t n = 0;
    while (n < width && sel[row * width + n] >= 0) ++n;
    return n;
  };
  std::vector<std::int32_t> full_row = good;
  for (std::int64_t w = 0; w < width; ++w) full_row[row * width + w] = w <= 6 ? static_cast<std::int32_t>(w) : -1;
  const std::vector<std::pair<const char*, std::function<void(std::int32_t*)>>> breaks = {
      {"current block missing", [](std::int32_t* r) { r[6] = -1; }},
      {"future block", [](std::int32_t* r) { r[6] = 7; }},
      {"descending", [](std::int32_t* r) { std::swap(r[0], r[1]); }},
      {"repeated", [](std::int32_t* r) { r[1] = r[0]; }},
      {"negative other than -1", [](std::int32_t* r) { r[0] = -2; }},
      {"entry after -1", [](std::int32_t* r) { r[3] = -1; }},
      {"beyond int range of blocks", [](std::int32_t* r) { r[6] = std::numeric_limits<std::int32_t>::max(); }},
  };
  REQUIRE(count_of(full_row) == 7);
  for (const auto& [what, mutate] : breaks) {
    const std::string kind = what;
    CAPTURE(kind);
    std::vector<std::int32_t> bad = full_row;
    mutate(bad.data() + row * width);
    outputs<T> o = poisoned_outputs(t, 0);
    const outputs<T> poison = o;
    forward_args<T> a = args_of(t, o);
    a.selection = selection(bad.data(), 1, t.total_q(), t.s.hq, width);
    auto call = [&] { attention<Backend, T>(cfg).forward(a); };
    CHECK_THROWS_WITH_AS(call(), doctest::Contains("selection("), invalid_argument);
    CHECK(std::memcmp(o.out.data(), poison.out.data(), poison.out.size() * sizeof(T)) == 0);
    CHECK(std::memcmp(o.lse.data(), poison.lse.data(), poison.lse.size() * sizeof(poison.lse[0])) == 0);
  }
}

template <class Backend, class T>
void suite_selection_input() {
  expect_selection_round_trip<Backend, T>(mode::sparse);
  expect_selection_round_trip<Backend, T>(mode::full);
  expect_selection_round_trip<Backend, T>(mode::sparse, true);
  expect_given_selection_attended<Backend, T>();
  expect_bad_selection_refused<Backend, T>();
}

}  // namespace moba::test
