// SPDX-License-Identifier: MIT
/// @file Type properties kernels rely on: views and params cross to a device by value.
#include <doctest/doctest.h>

#include <type_traits>

#include <moba/core/dispatch.hpp>
#include <moba/moba.hpp>

static_assert(std::is_trivially_copyable_v<moba::view4<const moba::bfloat16>>);
static_assert(std::is_trivially_copyable_v<moba::core::fwd_params<moba::float16>>);
static_assert(std::is_trivially_copyable_v<moba::sequence_layout>);
static_assert(sizeof(moba::bfloat16) == 2 && alignof(moba::bfloat16) == 2);
static_assert(std::is_same_v<moba::accum_t<moba::bfloat16>, float>);
static_assert(std::is_same_v<moba::gate_t<double>, double>);
// attention::workspace_size exists only where the backend can run in caller memory (moba::cuda).
template <class Attention, class Args>
concept has_workspace_size = requires(const Attention& a, const Args& args) { a.workspace_size(args); };
static_assert(!has_workspace_size<moba::attention<moba::reference, double>, moba::forward_args<double>>);
static_assert(moba::core::head_dim_list<64, 128>::contains(128) && !moba::core::head_dim_list<64, 128>::contains(96));

TEST_CASE("head-dim dispatch calls the constant for a listed dim and the fallback otherwise") {
  using dims = moba::core::head_dim_list<64, 128>;
  int seen = 0;
  moba::core::with_head_dim(dims{}, 128, [&](auto d) { seen = decltype(d)::value; }, [&] { seen = -1; });
  CHECK(seen == 128);
  moba::core::with_head_dim(dims{}, 96, [&](auto d) { seen = decltype(d)::value; }, [&] { seen = -1; });
  CHECK(seen == -1);
  CHECK(dims::describe() == "64, 128");
}
