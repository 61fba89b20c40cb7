// SPDX-License-Identifier: MIT
/// @file Head-dim dispatch: one list per backend drives kernels, errors and tests.
#pragma once

#include <string>
#include <type_traits>

namespace moba::core {

template <int... Dims>
struct head_dim_list {
  static constexpr bool contains(long long d) { return ((d == Dims) || ...); }
  static std::string describe() {
    std::string s;
    ((s += (s.empty() ? "" : ", ") + std::to_string(Dims)), ...);
    return s;
  }
};

/// Calls `fast(std::integral_constant<int, D>{})` for the D of the list equal to `d`, else `fallback()`.
template <int... Dims, class Fast, class Fallback>
decltype(auto) with_head_dim(head_dim_list<Dims...>, long long d, Fast&& fast, Fallback&& fallback) {
  using result = decltype(fallback());
  if constexpr (std::is_void_v<result>) {
    if (!((d == Dims ? (fast(std::integral_constant<int, Dims>{}), true) : false) || ...)) fallback();
  } else {
    result r{};
    if (!((d == Dims ? (r = fast(std::integral_constant<int, Dims>{}), true) : false) || ...)) r = fallback();
    return r;
  }
}

}  // namespace moba::core
