// SPDX-License-Identifier: MIT
/// @file Attended-pair counts equal a direct count of the keys each query sees.
#include <doctest/doctest.h>

#include <algorithm>
#include <random>

#include <moba/core/flops.hpp>

TEST_CASE("attended_pairs counts the causal current block plus whole history blocks") {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 50; ++trial) {
    const std::int64_t k_len = std::uniform_int_distribution<int>(1, 300)(rng);
    const std::int64_t q_len = std::uniform_int_distribution<std::int64_t>(1, k_len)(rng);
    const std::int64_t b = std::uniform_int_distribution<int>(1, 64)(rng), k = std::uniform_int_distribution<int>(1, 6)(rng);
    std::int64_t direct = 0, dense = 0;
    for (std::int64_t i = 0; i < q_len; ++i) {
      const std::int64_t pos = k_len - q_len + i, c = pos / b;
      direct += (pos - c * b + 1) + std::min(c, k - 1) * b;
      dense += pos + 1;
    }
    CHECK(moba::core::attended_pairs(q_len, k_len, b, k, false) == direct);
    CHECK(moba::core::attended_pairs(q_len, k_len, b, k, true) == dense);
  }
  CHECK(moba::core::forward_flops(10, 128) == 4.0 * 10 * 128);
}
