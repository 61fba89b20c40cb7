// SPDX-License-Identifier: MIT
/// @file The forward-pass property suite every backend instantiates with MOBA_FORWARD_CONFORMANCE.
/// Each property runs on fresh random inputs with poisoned outputs and is checked against the
/// float64 reference (or, where stated, against the same backend on an equivalent problem).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "support/support.hpp"

namespace moba::test {

/// Head dims the suite tries; each backend runs those it supports.
inline std::vector<std::int64_t> suite_head_dims() { return {16, 64, 80, 128}; }

template <class Backend, class T>
std::vector<std::int64_t> supported_dims() {
  std::vector<std::int64_t> dims;
  for (auto d : suite_head_dims())
    if (backend_impl<Backend, T>::supports_head_dim(d)) dims.push_back(d);
  return dims;
}

/// Runs Backend<T> and the float64 reference on the same inputs; checks out, lse and selection.
template <class Backend, class T>
void expect_matches_reference(const shape& s, const config& cfg) {
  const std::uint64_t seed = fresh_seed();
  CAPTURE(seed);
  CAPTURE(s.d);
  CAPTURE(cfg.block_size);
  CAPTURE(cfg.top_k);
  const tensors<T> t = random_tensors<T>(s, seed);
  const outputs<T> got = run<Backend, T>(t, cfg);
  outputs<double> want = run<reference, double>(widen(t), cfg);
  if constexpr (std::is_same_v<Backend, reference> && std::is_same_v<T, double>) {
    // The reference itself: against attention written out in the test over its own selection (the
    // gate's choice is checked by the core tests' hand-worked cases).
    const std::int64_t width = got.width;
    masked_attention(
        t, cfg.softmax_scale ? *cfg.softmax_scale : 1.0 / std::sqrt(static_cast<double>(s.d)),
        [&](std::int64_t row, std::int64_t h, std::int64_t, std::int64_t j) {
          for (std::int64_t w = 0; w < width; ++w)
            if (got.selected[(row * s.hq + h) * width + w] == j / cfg.block_size) return true;
          return false;
        },
        want.out, want.lse);
  }
  std::int64_t flips = 0;
  const std::vector<bool> keep = agreeing_rows(t, cfg, got.selected, want.selected, got.width, &flips);
  CHECK(flips * 100 <= static_cast<std::int64_t>(keep.size()));  // near-ties are rare on random inputs
  CHECK(rel_error(got.out, want.out, s.d, &keep) <= output_bound<T>());
  CHECK(rel_error(got.lse, want.lse, 1, &keep) <= output_bound<T>());
}

template <class Backend, class T>
void suite_matches_reference() {
  for (const std::int64_t d : supported_dims<Backend, T>()) {
    for (const auto& [block, top_k] : {std::pair{16, 3}, {64, 2}, {32, 8}, {128, 1}}) {
      for (const mode m : {mode::sparse, mode::full}) {
        config cfg;
        cfg.block_size = block;
        cfg.top_k = top_k;
        cfg.mode = m;
        // varlen with a zero-length sequence, one shorter than a block, and q_len < k_len.
        expect_matches_reference<Backend, T>({{0, 5, 300, 70}, {0, 5, 300, 200}, 4, 2, d}, cfg);
      }
    }
  }
}

template <class Backend, class T>
void suite_dense_equivalence() {
  const std::int64_t d = supported_dims<Backend, T>().front();
  const tensors<T> t = random_tensors<T>({{150, 37}, {150, 90}, 2, 2, d}, fresh_seed());
  std::vector<double> dense_out, dense_lse;
  dense_causal(widen(t), 1.0 / std::sqrt(static_cast<double>(d)), dense_out, dense_lse);
  config cfg;
  cfg.block_size = 16;
  SUBCASE("top_k >= number of blocks equals dense causal") { cfg.top_k = 10; }
  SUBCASE("mode full equals dense causal") {
    cfg.top_k = 2;
    cfg.mode = mode::full;
  }
  const outputs<T> got = run<Backend, T>(t, cfg);
  CHECK(rel_error(got.out, dense_out) <= output_bound<T>());
  CHECK(rel_error(got.lse, dense_lse) <= output_bound<T>());
}

template <class Backend, class T>
void suite_top1_is_blockwise_causal() {
  // top_k = 1 attends only inside the current block: cutting the sequence into separate
  // block-sized sequences must give the same result.
  const std::int64_t d = supported_dims<Backend, T>().front(), block = 32;
  const tensors<T> whole = random_tensors<T>({{100}, {100}, 2, 1, d}, fresh_seed());
  tensors<T> pieces = whole;
  pieces.s.q_lens = pieces.s.k_lens = {32, 32, 32, 4};
  pieces.cu_q = pieces.cu_k = {0, 32, 64, 96, 100};
  config cfg;
  cfg.block_size = block;
  cfg.top_k = 1;
  config dense = cfg;
  dense.mode = mode::full;
  const outputs<T> got = run<Backend, T>(whole, cfg);
  const outputs<double> want = run<reference, double>(widen(pieces), dense);
  CHECK(rel_error(got.out, want.out) <= output_bound<T>());
  CHECK(rel_error(got.lse, want.lse) <= output_bound<T>());
  for (std::int64_t row = 0; row < 100 * 2; ++row) CHECK(got.selected[row] == (row / 2) / block);
}

template <class Backend, class T>
void suite_gqa_equals_repeated_kv() {
  const std::int64_t d = supported_dims<Backend, T>().front(), hq = 6, hkv = 2;
  const tensors<T> gqa = random_tensors<T>({{90, 60}, {130, 60}, hq, hkv, d}, fresh_seed());
  tensors<T> mha = gqa;
  mha.s.hkv = hq;
  for (auto [from, to] : {std::pair{&gqa.k, &mha.k}, {&gqa.v, &mha.v}}) {
    to->clear();
    for (std::int64_t t = 0; t < gqa.total_k(); ++t)
      for (std::int64_t h = 0; h < hq; ++h)
        for (std::int64_t e = 0; e < d; ++e) to->push_back((*from)[(t * hkv + h / (hq / hkv)) * d + e]);
  }
  config cfg;
  cfg.block_size = 16;
  cfg.top_k = 3;
  const outputs<T> a = run<Backend, T>(gqa, cfg), b = run<Backend, T>(mha, cfg);
  CHECK(a.selected == b.selected);
  CHECK(rel_error(a.out, b.out) <= output_bound<T>());
  CHECK(rel_error(a.lse, b.lse) <= output_bound<T>());
}

template <class Backend, class T>
void suite_strided_layouts() {
  // Hugging Face [batch, heads, seq, dim] storage equals the packed layout of the same sequences.
  const std::int64_t d = supported_dims<Backend, T>().front(), batch = 2, seq = 70, hq = 4, hkv = 2;
  const tensors<T> t = random_tensors<T>({{seq, seq}, {seq, seq}, hq, hkv, d}, fresh_seed());
  auto to_bhsd = [&](const std::vector<T>& x, std::int64_t heads) {
    std::vector<T> y(x.size());
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t s = 0; s < seq; ++s)
        for (std::int64_t h = 0; h < heads; ++h)
          for (std::int64_t e = 0; e < d; ++e)
            y[((b * heads + h) * seq + s) * d + e] = x[(((b * seq) + s) * heads + h) * d + e];
    return y;
  };
  const std::vector<T> q = to_bhsd(t.q, hq), k = to_bhsd(t.k, hkv), v = to_bhsd(t.v, hkv);
  std::vector<T> out(q.size(), poison_value<T>());
  std::vector<accum_t<T>> lse(batch * hq * seq, poison_value<accum_t<T>>());
  config cfg;
  cfg.block_size = 16;
  cfg.top_k = 2;
  attention<Backend, T> attn(cfg);
  // lse as [batch, heads, seq] storage too: strides (heads*seq, 1, seq).
  runner<Backend, T>::forward(attn, {.q = bhsd(q.data(), batch, hq, seq, d),
                                     .k = bhsd(k.data(), batch, hkv, seq, d),
                                     .v = bhsd(v.data(), batch, hkv, seq, d),
                                     .out = bhsd(out.data(), batch, hq, seq, d),
                                     .lse = {lse.data(), {batch, seq, hq}, {hq * seq, 1, seq}}});
  const outputs<T> want = run<Backend, T>(t, cfg);
  CHECK(rel_error(to_bhsd(want.out, hq), out) <= output_bound<T>());
  std::vector<accum_t<T>> want_lse(lse.size());
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t s = 0; s < seq; ++s)
      for (std::int64_t h = 0; h < hq; ++h) want_lse[(b * hq + h) * seq + s] = want.lse[(b * seq + s) * hq + h];
  CHECK(rel_error(want_lse, lse) <= output_bound<T>());
}

template <class Backend, class T>
void suite_varlen_equals_separate_calls() {
  const std::int64_t d = supported_dims<Backend, T>().front();
  const shape s{{0, 7, 130, 3, 0}, {0, 7, 190, 40, 5}, 2, 1, d};
  const tensors<T> all = random_tensors<T>(s, fresh_seed());
  config cfg;
  cfg.block_size = 16;
  cfg.top_k = 3;
  const outputs<T> together = run<Backend, T>(all, cfg);
  for (std::size_t b = 0; b < s.q_lens.size(); ++b) {
    if (s.q_lens[b] == 0) continue;
    tensors<T> one;
    one.s = {{s.q_lens[b]}, {s.k_lens[b]}, s.hq, s.hkv, d};
    one.cu_q = {0, s.q_lens[b]};
    one.cu_k = {0, s.k_lens[b]};
    const std::int64_t qe = s.hq * d, ke = s.hkv * d;
    one.q.assign(all.q.begin() + all.cu_q[b] * qe, all.q.begin() + all.cu_q[b + 1] * qe);
    one.k.assign(all.k.begin() + all.cu_k[b] * ke, all.k.begin() + all.cu_k[b + 1] * ke);
    one.v.assign(all.v.begin() + all.cu_k[b] * ke, all.v.begin() + all.cu_k[b + 1] * ke);
    const outputs<T> alone = run<Backend, T>(one, cfg);
    const std::vector<T> slice(together.out.begin() + all.cu_q[b] * qe, together.out.begin() + all.cu_q[b + 1] * qe);
    CHECK(rel_error(slice, alone.out) <= output_bound<T>());
    const std::vector<std::int32_t> sel(together.selected.begin() + all.cu_q[b] * s.hq * cfg.top_k,
                                        together.selected.begin() + all.cu_q[b + 1] * s.hq * cfg.top_k);
    CHECK(sel == alone.selected);
  }
}

template <class Backend, class T>
void suite_chunked_prefill_is_bottom_right() {
  // q_len < k_len: the queries sit at the end; they equal the last rows of the full-length call.
  const std::int64_t d = supported_dims<Backend, T>().front(), n = 200, tail = 45;
  const tensors<T> full = random_tensors<T>({{n}, {n}, 2, 2, d}, fresh_seed());
  tensors<T> last = full;
  last.s.q_lens = {tail};
  last.cu_q = {0, tail};
  last.q.assign(full.q.end() - tail * 2 * d, full.q.end());
  config cfg;
  cfg.block_size = 32;
  cfg.top_k = 3;
  const outputs<T> a = run<Backend, T>(full, cfg), b = run<Backend, T>(last, cfg);
  const std::vector<T> a_tail(a.out.end() - tail * 2 * d, a.out.end());
  CHECK(rel_error(b.out, a_tail) <= output_bound<T>());
  CHECK(std::equal(b.selected.begin(), b.selected.end(), a.selected.end() - tail * 2 * cfg.top_k));
}

template <class Backend, class T>
void suite_ties_go_to_the_lower_block() {
  // Every key block a copy of the first, and q and k on a coarse dyadic grid so that every sum is
  // exact in any order: all gate scores tie exactly, and each query selects its lowest history
  // blocks besides its current one (SPEC §Blocks 5).
  const std::int64_t d = supported_dims<Backend, T>().front(), block = 16, n = 160, hq = 2;
  tensors<T> t = random_tensors<T>({{n}, {n}, hq, 1, d}, fresh_seed());
  auto coarse = [](T x, double grid) { return from_double<T>(std::clamp(std::round(to_double(x) * grid), -grid, grid) / grid); };
  for (T& x : t.q) x = coarse(x, 4);
  for (std::int64_t x = 0; x < n * d; ++x) t.k[x] = x < block * d ? coarse(t.k[x], 8) : t.k[x % (block * d)];
  config cfg;
  cfg.block_size = block;
  cfg.top_k = 4;
  const outputs<T> got = run<Backend, T>(t, cfg);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t h = 0; h < hq; ++h) {
      const std::int64_t c = i / block;
      std::vector<std::int32_t> want;
      for (std::int64_t j = 0; j < std::min<std::int64_t>(c, cfg.top_k - 1); ++j) want.push_back(static_cast<std::int32_t>(j));
      want.push_back(static_cast<std::int32_t>(c));
      want.resize(cfg.top_k, -1);
      const auto at = got.selected.begin() + (i * hq + h) * got.width;
      CHECK_MESSAGE(std::equal(want.begin(), want.end(), at), "query ", i, " head ", h);
    }
  const outputs<double> ref = run<reference, double>(widen(t), cfg);
  CHECK(got.selected == ref.selected);
  CHECK(rel_error(got.out, ref.out) <= output_bound<T>());
}

template <class Backend, class T>
void suite_wide_selection_is_ascending_and_padded() {
  // A selection view wider than K: each row holds its blocks ascending, then -1 to the end, exactly
  // as the reference writes it wherever the two choose the same blocks.
  const std::int64_t d = supported_dims<Backend, T>().front(), extra = 3;
  const tensors<T> t = random_tensors<T>({{300, 70}, {300, 200}, 4, 2, d}, fresh_seed());
  config cfg;
  cfg.block_size = 16;
  cfg.top_k = 5;
  const outputs<T> got = run<Backend, T>(t, cfg, extra);
  const outputs<double> want = run<reference, double>(widen(t), cfg, extra);
  std::int64_t flips = 0;
  const std::vector<bool> keep = agreeing_rows(t, cfg, got.selected, want.selected, got.width, &flips);
  std::int64_t unequal = 0, unpadded = 0;
  for (std::size_t row = 0; row < keep.size(); ++row) {
    const auto g = got.selected.begin() + row * got.width, w = want.selected.begin() + row * got.width;
    unequal += keep[row] && !std::equal(g, g + got.width, w);
    unpadded += std::any_of(g + cfg.top_k, g + got.width, [](std::int32_t b) { return b != -1; });
  }
  CHECK(unequal == 0);
  CHECK(unpadded == 0);
  CHECK(flips * 100 <= static_cast<std::int64_t>(keep.size()));
}

template <class Backend, class T>
void suite_errors_leave_outputs_untouched() {
  const std::int64_t d = supported_dims<Backend, T>().front();
  const tensors<T> t = random_tensors<T>({{20}, {20}, 2, 1, d}, fresh_seed());
  std::vector<T> out(t.q.size(), poison_value<T>());
  config cfg;
  cfg.block_size = 4;
  cfg.top_k = 2;
  attention<Backend, T> attn(cfg);
  forward_args<T> args{.q = t.q_view(), .k = t.k_view(), .v = t.v_view(), .out = packed(out.data(), 20, 2, d)};
  const std::vector<std::int32_t> bad_cu{0, 25};
  args.cu_seqlens_q = bad_cu;
  args.cu_seqlens_k = bad_cu;
  auto call = [&] { runner<Backend, T>::forward(attn, args); };
  CHECK_THROWS_WITH_AS(call(), doctest::Contains("cu_seqlens_q[1] = 25"), std::invalid_argument);
  CHECK(std::all_of(out.begin(), out.end(), [](T x) { return std::isnan(to_double(x)); }));
}

}  // namespace moba::test

/// Instantiates the suite for `Backend` over the dtypes listed after it.
#define MOBA_FORWARD_CONFORMANCE(Backend, ...)                                                                   \
  TEST_CASE_TEMPLATE(#Backend ": matches the float64 reference (varlen, GQA, q_len < k_len, both modes)", T,      \
                     __VA_ARGS__) {                                                                              \
    moba::test::suite_matches_reference<Backend, T>();                                                          \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": top_k >= blocks and mode full equal dense causal", T, __VA_ARGS__) {            \
    moba::test::suite_dense_equivalence<Backend, T>();                                                          \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": top_k = 1 equals causal attention inside each block", T, __VA_ARGS__) {         \
    moba::test::suite_top1_is_blockwise_causal<Backend, T>();                                                   \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": GQA equals MHA with repeated K/V", T, __VA_ARGS__) {                            \
    moba::test::suite_gqa_equals_repeated_kv<Backend, T>();                                                     \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": Hugging Face strided layout equals the packed layout", T, __VA_ARGS__) {        \
    moba::test::suite_strided_layouts<Backend, T>();                                                            \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": a varlen batch equals separate calls", T, __VA_ARGS__) {                        \
    moba::test::suite_varlen_equals_separate_calls<Backend, T>();                                               \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": q_len < k_len equals the last rows of the full-length call", T, __VA_ARGS__) {  \
    moba::test::suite_chunked_prefill_is_bottom_right<Backend, T>();                                            \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": equal gate scores select the lower block", T, __VA_ARGS__) {                    \
    moba::test::suite_ties_go_to_the_lower_block<Backend, T>();                                                 \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": a wide selection view is ascending, then -1", T, __VA_ARGS__) {               \
    moba::test::suite_wide_selection_is_ascending_and_padded<Backend, T>();                                      \
  }                                                                                                              \
  TEST_CASE_TEMPLATE(#Backend ": a bad argument throws and leaves the output untouched", T, __VA_ARGS__) {       \
    moba::test::suite_errors_leave_outputs_untouched<Backend, T>();                                             \
  }
