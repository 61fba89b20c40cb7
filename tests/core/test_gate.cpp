// SPDX-License-Identifier: MIT
/// @file Gating rules of SPEC §Blocks: ranking with ties and NaN, streaming top-n, history counts.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>

using moba::core::ranks_before;

TEST_CASE("ranking: higher score first, ties to the lower block, NaN below every number") {
  CHECK(ranks_before(2.0, 5, 1.0, 0));
  CHECK_FALSE(ranks_before(1.0, 0, 2.0, 5));
  CHECK(ranks_before(1.0, 2, 1.0, 3));
  CHECK_FALSE(ranks_before(1.0, 3, 1.0, 2));
  CHECK(ranks_before(-INFINITY, 9, NAN, 0));
  CHECK_FALSE(ranks_before(NAN, 0, -INFINITY, 9));
  CHECK(ranks_before(NAN, 1, NAN, 4));
}

TEST_CASE("top_n keeps the n best in rank order, equal to a full sort") {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 200; ++trial) {
    const int count = std::uniform_int_distribution<int>(0, 40)(rng), n = std::uniform_int_distribution<int>(0, 8)(rng);
    std::vector<float> score(count);
    // Few distinct values so that ties are common; some NaN.
    for (auto& s : score) s = std::uniform_int_distribution<int>(0, 9)(rng) == 0 ? NAN : std::uniform_int_distribution<int>(-3, 3)(rng);
    std::vector<std::int64_t> order(count);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int64_t a, std::int64_t b) { return ranks_before(score[a], a, score[b], b); });
    std::vector<std::int64_t> idx(n);
    std::vector<float> best(n);
    moba::core::top_n<float> top{idx.data(), best.data(), n};
    for (int j = 0; j < count; ++j) top.offer(score[j], j);
    REQUIRE(top.size == std::min(count, n));
    for (int r = 0; r < top.size; ++r) CHECK(idx[r] == order[r]);
  }
}

TEST_CASE("history_count: K-1 eligible blocks, fewer when fewer exist, all in full mode") {
  CHECK(moba::core::history_count(0, 3, false) == 0);
  CHECK(moba::core::history_count(1, 3, false) == 1);
  CHECK(moba::core::history_count(5, 3, false) == 2);
  CHECK(moba::core::history_count(5, 1, false) == 0);
  CHECK(moba::core::history_count(5, 1, true) == 5);
}

TEST_CASE("blocks: the last block is partial, the current block is floor(pos / B)") {
  CHECK(moba::core::block_count(10, 4) == 3);
  CHECK(moba::core::block_end(2, 4, 10) == 10);
  CHECK(moba::core::block_count(0, 4) == 0);
  CHECK(moba::core::current_block(7, 4) == 1);
  CHECK(moba::core::current_block(8, 4) == 2);
}

TEST_CASE("rank keys order (score, block) pairs exactly as ranks_before, special values included") {
  const std::uint64_t seed = std::random_device{}();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const float specials[] = {NAN, -NAN, INFINITY, -INFINITY, 0.f, -0.f, 1e-45f, -1e-45f, 3.4e38f, -3.4e38f, 1.f, -1.f};
  std::normal_distribution<float> normal;
  auto draw = [&] { return rng() % 3 == 0 ? specials[rng() % std::size(specials)] : normal(rng); };
  for (int n = 0; n < 4000; ++n) {
    const float a = draw(), b = rng() % 4 == 0 ? a : draw();
    const std::int64_t i = static_cast<std::int64_t>(rng() % 64), j = static_cast<std::int64_t>(rng() % 64);
    if (i == j) continue;
    CAPTURE(a);
    CAPTURE(b);
    CHECK((moba::core::rank_key(a, i) > moba::core::rank_key(b, j)) == ranks_before(a, i, b, j));
    CHECK(moba::core::key_block(moba::core::rank_key(a, i)) == i);
    // A key's floor is the least score that still ranks with it: the score itself (+0 for -0), -inf for NaN.
    const float floor = moba::core::key_score(moba::core::rank_key(a, i));
    if (std::isnan(a)) CHECK(floor == -INFINITY);
    else CHECK(floor == a);
  }
}

TEST_CASE("a query attends the whole of a history block and its current block up to itself") {
  using moba::core::attended_range;
  CHECK((attended_range(2, 40, 8).begin == 16 && attended_range(2, 40, 8).end == 24));  // history
  CHECK((attended_range(5, 42, 8).begin == 40 && attended_range(5, 42, 8).end == 43));  // current: causal
  CHECK((attended_range(5, 47, 8).end == 48));
  CHECK(attended_range(0, 0, std::int64_t{1} << 62).end == 1);  // no overflow at huge blocks
}

TEST_CASE("selection width: the current block plus the history blocks the last query can select") {
  using moba::core::selection_width;
  CHECK(selection_width(0, 3, false) == 1);
  CHECK(selection_width(1, 3, false) == 2);
  CHECK(selection_width(9, 3, false) == 3);
  CHECK(selection_width(9, std::int64_t{1} << 40, false) == 10);  // top_k beyond the blocks: all of them
  CHECK(selection_width(9, 3, true) == 10);
}
