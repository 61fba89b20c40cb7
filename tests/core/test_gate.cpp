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
