// SPDX-License-Identifier: MIT
/// @file Gating rules: the ranking of history blocks and top-k selection (SPEC §Blocks 3–5).
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#include <moba/detail/macros.hpp>

namespace moba::core {

/// Whether block `a` outranks block `b`: higher score first, a NaN score below every number,
/// and on equal scores (or two NaNs) the lower block index wins (SPEC §Blocks 5).
template <class S>
MOBA_HOST_DEVICE bool ranks_before(S score_a, std::int64_t a, S score_b, std::int64_t b) {
  const bool nan_a = score_a != score_a, nan_b = score_b != score_b;
  if (nan_a != nan_b) return nan_b;
  if (!nan_a && score_a != score_b) return score_a > score_b;
  return a < b;
}

/// The ranking of ranks_before as integers, for kernels that rank by comparing keys (fp32 scores).
/// A score's bits as an unsigned integer that orders as SPEC §Blocks 5 ranks scores: higher first,
/// a NaN below every number (0), -0 equal to +0.
MOBA_HOST_DEVICE std::uint32_t ordered_score(float score) {
  std::uint32_t u;
  const float plain = score + 0.f;  // -0 becomes +0
  std::memcpy(&u, &plain, sizeof u);
  return score != score ? 0u : (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

/// A (score, block) pair as one integer that orders like ranks_before: by score, then the lower block.
MOBA_HOST_DEVICE std::uint64_t rank_key(float score, std::int64_t j) {
  return (std::uint64_t{ordered_score(score)} << 32) | (0xffffffffu - static_cast<std::uint32_t>(j));
}

/// The block of a rank key.
MOBA_HOST_DEVICE std::int32_t key_block(std::uint64_t key) {
  return static_cast<std::int32_t>(0xffffffffu - static_cast<std::uint32_t>(key));
}

/// The score of an ordered_score, as a float that a block's score must reach to beat it (a NaN
/// score, which every number beats, becomes -inf).
MOBA_HOST_DEVICE float ordered_floor(std::uint32_t u) {
  if (u == 0) return -INFINITY;
  const std::uint32_t bits = u & 0x80000000u ? u & 0x7fffffffu : ~u;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// The score of a rank key, as ordered_floor.
MOBA_HOST_DEVICE float key_score(std::uint64_t key) { return ordered_floor(static_cast<std::uint32_t>(key >> 32)); }

/// Streaming top-n over candidates offered one at a time; keeps `best` sorted by rank.
/// `best_index`/`best_score` are caller storage of capacity `n` (no allocation: usable in kernels).
template <class S>
struct top_n {
  std::int64_t* best_index;
  S* best_score;
  std::int64_t n;
  std::int64_t size = 0;

  MOBA_HOST_DEVICE void offer(S score, std::int64_t index) {
    if (n <= 0) return;
    if (size == n && !ranks_before(score, index, best_score[size - 1], best_index[size - 1])) return;
    std::int64_t at = size < n ? size++ : n - 1;
    while (at > 0 && ranks_before(score, index, best_score[at - 1], best_index[at - 1])) {
      best_score[at] = best_score[at - 1];
      best_index[at] = best_index[at - 1];
      --at;
    }
    best_score[at] = score;
    best_index[at] = index;
  }
};

/// How many history blocks a query with current block `current` selects: top (K−1) of the
/// `current` eligible blocks, all of them if fewer (SPEC §Blocks 5). `full` selects every one.
MOBA_HOST_DEVICE std::int64_t history_count(std::int64_t current, std::int64_t top_k, bool full) {
  if (full) return current;
  return current < top_k - 1 ? current : top_k - 1;
}

/// Entries a selection needs for queries whose current block is at most `last_current`: the current
/// block plus its history blocks (SPEC §Blocks 5); the width of the `selected` output.
MOBA_HOST_DEVICE std::int64_t selection_width(std::int64_t last_current, std::int64_t top_k, bool full) {
  return history_count(last_current, top_k, full) + 1;
}

/// Sort block indices ascending in place (insertion sort: selections are short).
MOBA_HOST_DEVICE void sort_ascending(std::int64_t* idx, std::int64_t n) {
  for (std::int64_t i = 1; i < n; ++i) {
    const std::int64_t v = idx[i];
    std::int64_t j = i;
    for (; j > 0 && idx[j - 1] > v; --j) idx[j] = idx[j - 1];
    idx[j] = v;
  }
}

}  // namespace moba::core
