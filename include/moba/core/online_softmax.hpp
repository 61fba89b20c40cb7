// SPDX-License-Identifier: MIT
/// @file Merging two partial softmax results by their log-sum-exp (SPEC §Attention).
#pragma once

#include <cmath>

#include <moba/detail/macros.hpp>

namespace moba::core {

/// lse = log(e^a + e^b), where an empty part has lse = -inf and weight 0.
template <class A>
MOBA_HOST_DEVICE A merge_lse(A a, A b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const A hi = a > b ? a : b, lo = a > b ? b : a;
  return hi + std::log1p(std::exp(lo - hi));
}

/// The same in base 2, lse2 = log2(2^a + 2^b), as kernels that keep scores in log2 units merge
/// their passes (written as they compute it, so that every caller gets the same bits).
template <class A>
MOBA_HOST_DEVICE A merge_lse2(A a, A b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const A hi = a > b ? a : b;
  return hi + std::log2(std::exp2(a - hi) + std::exp2(b - hi));
}

/// The weight e^(part − total) of a part in the merged output; 0 for an empty part.
template <class A>
MOBA_HOST_DEVICE A part_weight(A part_lse, A total_lse) {
  return part_lse == -INFINITY ? A(0) : std::exp(part_lse - total_lse);
}

}  // namespace moba::core
