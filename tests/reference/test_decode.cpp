// SPDX-License-Identifier: MIT
/// @file Decode with a paged KV cache: token-by-token decode equals the rows of one prefill forward.
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "support/support.hpp"

namespace {

constexpr std::int64_t seqs = 3, steps = 45, hq = 4, hkv = 2, dim = 8, page_size = 5;
constexpr std::int64_t pages_per_seq = (steps + page_size - 1) / page_size;

/// A cache of shuffled pages, poisoned, so that order and stale memory cannot hide a bug.
template <class T>
struct cache_storage {
  std::vector<T> k = std::vector<T>(seqs * pages_per_seq * page_size * hkv * dim, moba::test::poison_value<T>());
  std::vector<T> v = k;
  std::vector<moba::gate_t<T>> sums;
  std::vector<std::int32_t> table = std::vector<std::int32_t>(seqs * pages_per_seq);
  std::vector<std::int32_t> seqlens = std::vector<std::int32_t>(seqs, 0);
  std::int64_t max_blocks;

  cache_storage(std::int64_t block_size, std::uint64_t seed) : max_blocks((steps + block_size - 1) / block_size) {
    sums.assign(seqs * max_blocks * hkv * dim, moba::test::poison_value<moba::gate_t<T>>());
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937_64(seed));
  }
  moba::paged_kv_cache<T> view() {
    return {moba::bshd(k.data(), seqs * pages_per_seq, page_size, hkv, dim),
            moba::bshd(v.data(), seqs * pages_per_seq, page_size, hkv, dim),
            {sums.data(), {seqs, max_blocks, hkv, dim}, {max_blocks * hkv * dim, hkv * dim, dim, 1}},
            {table.data(), {seqs, pages_per_seq}, {pages_per_seq, 1}},
            seqlens};
  }
};

/// Token `step` of every sequence of a packed [seqs * steps, heads, dim] tensor, as [seqs, 1, heads, dim].
template <class T>
moba::view4<T> token(T* base, std::int64_t step, std::int64_t heads) {
  return {base + step * heads * dim, {seqs, 1, heads, dim}, {steps * heads * dim, heads * dim, dim, 1}};
}

}  // namespace

TEST_CASE_TEMPLATE("token-by-token decode over a paged cache equals the prefill forward's rows", T, double, float) {
  const std::uint64_t seed = moba::test::fresh_seed();
  CAPTURE(seed);
  const auto t = moba::test::random_tensors<T>({{steps, steps, steps}, {steps, steps, steps}, hq, hkv, dim}, seed);
  moba::config cfg;
  cfg.block_size = 8;
  cfg.top_k = 3;
  SUBCASE("sparse") {}
  SUBCASE("full") { cfg.mode = moba::mode::full; }
  const auto want = moba::test::run<moba::reference, T>(t, cfg);

  cache_storage<T> cache(cfg.block_size, seed);
  moba::test::outputs<T> got;
  got.width = want.width;
  got.out.assign(want.out.size(), moba::test::poison_value<T>());
  got.lse.assign(want.lse.size(), moba::test::poison_value<moba::accum_t<T>>());
  got.selected.assign(want.selected.size(), -7);
  moba::attention<moba::reference, T> attn(cfg);
  for (std::int64_t step = 0; step < steps; ++step) {
    attn.decode({.q = token(t.q.data(), step, hq),
                 .k_new = token(t.k.data(), step, hkv),
                 .v_new = token(t.v.data(), step, hkv),
                 .cache = cache.view(),
                 .out = token(got.out.data(), step, hq),
                 .lse = {got.lse.data() + step * hq, {seqs, 1, hq}, {steps * hq, hq, 1}},
                 .selected = {got.selected.data() + step * hq * got.width,
                              {seqs, 1, hq, got.width},
                              {steps * hq * got.width, hq * got.width, got.width, 1}}});
    for (auto& n : cache.seqlens) ++n;
  }
  std::int64_t flips = 0;
  const auto keep = moba::test::agreeing_rows(t, cfg, got.selected, want.selected, got.width, &flips);
  CHECK(flips == 0);  // running sums in gate precision rank like the block means on random inputs
  CHECK(moba::test::rel_error(got.out, want.out, dim, &keep) <= moba::test::output_bound<T>());
  CHECK(moba::test::rel_error(got.lse, want.lse, 1, &keep) <= moba::test::output_bound<T>());
}

TEST_CASE("decode rejects a page-table entry outside the cache before writing anything") {
  const auto t = moba::test::random_tensors<float>({{steps, steps, steps}, {steps, steps, steps}, hq, hkv, dim}, 7);
  moba::config cfg;
  cfg.block_size = 8;
  cache_storage<float> cache(cfg.block_size, 7);
  cache.seqlens = {0, 12, 3};
  cache.table[1 * pages_per_seq + 2] = 99;  // sequence 1 writes token 12 into its page 2
  std::vector<float> out(seqs * hq * dim, NAN);
  moba::attention<moba::reference, float> attn(cfg);
  CHECK_THROWS_WITH_AS(attn.decode({.q = token(t.q.data(), 0, hq),
                                    .k_new = token(t.k.data(), 0, hkv),
                                    .v_new = token(t.v.data(), 0, hkv),
                                    .cache = cache.view(),
                                    .out = moba::bshd(out.data(), seqs, 1, hq, dim)}),
                       "moba: cache.page_table(1, 2) = 99 is not a page in [0, 27)", std::invalid_argument);
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return std::isnan(x); }));
  CHECK(std::all_of(cache.k.begin(), cache.k.end(), [](float x) { return std::isnan(x); }));
}
