// SPDX-License-Identifier: MIT
/// @file Every error of SPEC §Bad input is raised, names the argument and the values, and writes nothing.
#include <doctest/doctest.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <moba/core/dispatch.hpp>

#include "support/support.hpp"

namespace {

using moba::test::poison_value;

/// A valid packed problem (two sequences) plus poisoned outputs, ready to be broken by one edit.
struct problem {
  moba::test::tensors<float> t = moba::test::random_tensors<float>({{6, 10}, {8, 10}, 4, 2, 8}, moba::test::fresh_seed());
  std::vector<float> out = std::vector<float>(t.q.size(), NAN);
  std::vector<float> lse = std::vector<float>(16 * 4, NAN);
  std::vector<std::int32_t> selected = std::vector<std::int32_t>(16 * 4 * 2, -7);
  std::vector<std::int32_t> cu_q = t.cu_q, cu_k = t.cu_k;
  moba::config cfg = [] {
    moba::config c;
    c.block_size = 4;
    c.top_k = 2;
    return c;
  }();
  moba::forward_args<float> args() {
    return {.q = t.q_view(),
            .k = t.k_view(),
            .v = t.v_view(),
            .out = moba::packed(out.data(), 16, 4, 8),
            .lse = moba::bsh(lse.data(), 1, 16, 4),
            .selected = moba::selection(selected.data(), 1, 16, 4, 2),
            .cu_seqlens_q = cu_q,
            .cu_seqlens_k = cu_k};
  }
  bool untouched() const {
    for (float x : out) if (!std::isnan(x)) return false;
    for (float x : lse) if (!std::isnan(x)) return false;
    for (auto x : selected) if (x != -7) return false;
    return true;
  }
};

/// Runs `edit` on a fresh problem, expects an invalid_argument whose message contains `needle`, and
/// checks that no output changed.
void expect_error(const std::string& needle, const std::function<void(problem&, moba::forward_args<float>&)>& edit) {
  problem p;
  auto a = p.args();
  edit(p, a);
  CAPTURE(needle);
  try {
    moba::attention<moba::reference, float> attn(p.cfg);
    attn.forward(a);
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, std::string(e.what()));
  }
  CHECK(p.untouched());
}

}  // namespace

TEST_CASE("a valid problem runs (the error cases below are single edits of it)") {
  problem p;
  moba::attention<moba::reference, float> attn(p.cfg);
  attn.forward(p.args());
  CHECK_FALSE(std::isnan(p.out[0]));
}

TEST_CASE("every bad argument throws before writing, naming the argument and the values") {
  expect_error("block_size = 0", [](problem& p, auto&) { p.cfg.block_size = 0; });
  expect_error("top_k = 0", [](problem& p, auto&) { p.cfg.top_k = 0; });
  expect_error("softmax_scale = inf", [](problem& p, auto&) { p.cfg.softmax_scale = INFINITY; });
  expect_error("Hq % Hkv != 0: Hq = 4, Hkv = 3", [](problem&, auto& a) { a.k.extent[2] = a.v.extent[2] = 3; });
  expect_error("head dims differ: q has 8, k has 4", [](problem&, auto& a) { a.k.extent[3] = 4; });
  expect_error("cu_seqlens_q[0] = 1", [](problem& p, auto&) { p.cu_q[0] = 1; });
  expect_error("cu_seqlens_k decreases", [](problem& p, auto&) { p.cu_k = {0, 12, 11}; });
  expect_error("cu_seqlens_q[2] = 15 must equal the number of tokens in the tensor, 16",
               [](problem& p, auto&) { p.cu_q[2] = 15; });
  expect_error("q_len > k_len in sequence 0: q_len = 12, k_len = 8", [](problem& p, auto&) { p.cu_q = {0, 12, 16}; });
  expect_error("give both cu_seqlens_q and cu_seqlens_k", [](problem&, auto& a) { a.cu_seqlens_k = {}; });
  expect_error("q is null", [](problem&, auto& a) { a.q.data = nullptr; });
  expect_error("is not aligned to 4 bytes", [](problem& p, auto& a) {
    a.out.data = reinterpret_cast<float*>(reinterpret_cast<char*>(p.out.data()) + 1);
    a.out.extent[1] = 15;  // keep the shifted view inside the buffer
  });
  expect_error("output out overlaps input q", [](problem& p, auto& a) {
    a.out.data = const_cast<float*>(p.t.q.data());
  });
  expect_error("out has shape [1, 15, 4, 8] but q has [1, 16, 4, 8]", [](problem&, auto& a) { a.out.extent[1] = 15; });
  expect_error("lse has shape", [](problem&, auto& a) { a.lse.extent[2] = 3; });
  expect_error("selected width = 1 cannot hold the 2 blocks", [](problem&, auto& a) { a.selected.extent[3] = 1; });
  expect_error("q: the head dim must be contiguous", [](problem&, auto& a) { a.q.stride[3] = 2; });
  expect_error("element offsets overflow 64 bits", [](problem&, auto& a) { a.k.stride[1] = std::numeric_limits<std::int64_t>::max() / 4; });
  expect_error("with cu_seqlens the tensors are packed: batch extent must be 1, got 2",
               [](problem&, auto& a) { a.q.extent[0] = a.k.extent[0] = a.v.extent[0] = a.out.extent[0] = 2; });
}

TEST_CASE("offsets are 64-bit: a million tokens x 32 heads x 128 dims validates without overflow") {
  const std::int64_t tokens = 1 << 20, heads = 32, dim = 128;
  // Never dereferenced: only the validator sees these addresses.
  auto* q = reinterpret_cast<const moba::bfloat16*>(std::uintptr_t{1} << 40);
  auto* k = q + tokens * heads * dim;
  auto* v = k + tokens * heads * dim;
  auto* out = const_cast<moba::bfloat16*>(v + tokens * heads * dim);
  const std::vector<std::int32_t> cu{0, static_cast<std::int32_t>(tokens)};
  moba::config cfg;
  const auto p = moba::detail::make_fwd_params<moba::bfloat16>(
      cfg, {.q = moba::packed(q, tokens, heads, dim),
            .k = moba::packed(k, tokens, heads, dim),
            .v = moba::packed(v, tokens, heads, dim),
            .out = moba::packed(out, tokens, heads, dim),
            .cu_seqlens_q = cu,
            .cu_seqlens_k = cu});
  CHECK(&p.out(0, tokens - 1, heads - 1, dim - 1) - out == tokens * heads * dim - 1);
  CHECK(p.seqs[0].k_len == tokens);
}

namespace {
/// A backend that supports only head dims 64 and 128, as a GPU backend might; it runs the reference.
struct narrow_backend {};
}  // namespace

template <class Dtype>
struct moba::backend_impl<narrow_backend, Dtype> : moba::backend_impl<moba::reference, Dtype> {
  using dims = moba::core::head_dim_list<64, 128>;
  static constexpr const char* name = "narrow_backend";
  using moba::backend_impl<moba::reference, Dtype>::backend_impl;
  static bool supports_head_dim(std::int64_t d) { return dims::contains(d); }
  static std::string head_dims() { return dims::describe(); }
};

TEST_CASE("a head dim the backend does not support is named with the dims it does") {
  problem p;  // head dim 8
  moba::attention<narrow_backend, float> attn(p.cfg);
  CHECK_THROWS_WITH_AS(attn.forward(p.args()), "moba: narrow_backend supports head dims 64, 128; got 8",
                       std::invalid_argument);
  CHECK(p.untouched());
}
