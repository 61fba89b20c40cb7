// SPDX-License-Identifier: MIT
/// @file Careless and hostile arguments (issue 25, classes 1, 2 and 4): outputs that hold the call's own
/// metadata or overlap themselves, and sizes that overflow, are refused before anything is written, on
/// every host backend. Before the checks these cases corrupted the heap or overflowed (ASan/UBSan in CI).
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "support/support.hpp"

namespace {

using cpu_float = moba::attention<moba::cpu, float>;
constexpr std::int64_t hq = 2, hkv = 1, d = 8, total = 24;

/// One packed problem of two sequences with int32 scratch large enough to hold a selection, the
/// offsets and a few spare words, all in one buffer so that views of it can be made to alias.
struct problem {
  moba::test::tensors<float> t = moba::test::random_tensors<float>({{10, 14}, {10, 14}, hq, hkv, d}, moba::test::fresh_seed());
  std::vector<float> out = std::vector<float>(total * hq * d, NAN);
  std::vector<float> lse = std::vector<float>(total * hq, NAN);
  std::vector<std::int32_t> words = std::vector<std::int32_t>(total * hq * 2 + 8, -7);  // selected, then offsets
  std::int32_t* cu_q = words.data() + total * hq * 2;
  std::int32_t* cu_k = cu_q + 3;
  moba::config cfg = [] {
    moba::config c;
    c.block_size = 4;
    c.top_k = 2;
    return c;
  }();
  problem() {
    for (int s = 0; s < 3; ++s) cu_q[s] = cu_k[s] = t.cu_q[s];
  }
  moba::forward_args<float> args() {
    return {.q = t.q_view(),
            .k = t.k_view(),
            .v = t.v_view(),
            .out = moba::packed(out.data(), total, hq, d),
            .lse = moba::bsh(lse.data(), 1, total, hq),
            .selected = moba::selection(words.data(), 1, total, hq, 2),
            .cu_seqlens_q = std::span<const std::int32_t>(cu_q, 3),
            .cu_seqlens_k = std::span<const std::int32_t>(cu_k, 3)};
  }
  bool untouched() const {
    for (float x : out) if (!std::isnan(x)) return false;
    for (const float& x : lse)
      if (!std::isnan(x) && static_cast<const void*>(&x) != cu_k && &x != reinterpret_cast<const float*>(cu_k) + 1 &&
          &x != reinterpret_cast<const float*>(cu_k) + 2)
        return false;
    for (std::size_t i = 0; i < total * hq * 2; ++i) if (words[i] != -7) return false;
    return cu_q[0] == 0 && cu_q[2] == total && cu_k[2] == total;
  }
};

template <class Backend>
void expect_refused(const std::string& needle, void (*edit)(problem&, moba::forward_args<float>&)) {
  problem p;
  auto a = p.args();
  edit(p, a);
  CAPTURE(needle);
  moba::attention<Backend, float> attn(p.cfg);
  try {
    attn.forward(a);
    FAIL("no exception");
  } catch (const moba::invalid_argument& e) {
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
  }
  CHECK(p.untouched());
}

template <class Backend>
void refuses_bad_outputs() {
  // Class 1: outputs that hold the offsets the backend reads.
  expect_refused<Backend>("output selected overlaps input cu_seqlens_q", [](problem& p, auto& a) {
    a.selected.data = p.cu_q - 2;  // the selection's last row ends on the offsets
  });
  expect_refused<Backend>("output lse overlaps input cu_seqlens_k", [](problem& p, auto& a) {
    // the k offsets live in the last three words of the lse buffer
    p.cu_k = reinterpret_cast<std::int32_t*>(p.lse.data() + total * hq - 3);
    for (int s = 0; s < 3; ++s) p.cu_k[s] = p.t.cu_k[s];
    a.cu_seqlens_k = std::span<const std::int32_t>(p.cu_k, 3);
  });
  // Class 2: outputs whose own elements overlap.
  expect_refused<Backend>("out overlaps itself", [](problem&, auto& a) { a.out.stride[1] = 0; });
  expect_refused<Backend>("out overlaps itself", [](problem&, auto& a) { a.out.stride[2] = 1; });
  expect_refused<Backend>("lse overlaps itself", [](problem&, auto& a) { a.lse.stride[1] = 0; });
  expect_refused<Backend>("selected overlaps itself", [](problem&, auto& a) { a.selected.stride[3] = 0; });
  expect_refused<Backend>("selected overlaps itself", [](problem&, auto& a) { a.selected.stride[1] = 1; });
  // Class 4: sizes that overflow are refused, not wrapped.
  expect_refused<Backend>("element offsets overflow", [](problem&, auto& a) {
    a.out.stride[0] = std::numeric_limits<std::int64_t>::max() / 2;
    a.out.extent[0] = 3;
  });
}

}  // namespace

TEST_CASE("reference: outputs holding the call's offsets or overlapping themselves are refused before writing") {
  refuses_bad_outputs<moba::reference>();
}

TEST_CASE("cpu: outputs holding the call's offsets or overlapping themselves are refused before writing") {
  refuses_bad_outputs<moba::cpu>();
}

TEST_CASE("a valid output layout that is not contiguous still passes the self-overlap check") {
  problem p;
  // out as [batch, seq, heads, dim] with heads and tokens swapped in memory (bhsd-like), and padding.
  std::vector<float> wide(total * hq * (d + 3), NAN);
  auto a = p.args();
  a.out = {wide.data(), {1, total, hq, d}, {0, d + 3, total * (d + 3), 1}};
  moba::attention<moba::reference, float> attn(p.cfg);
  attn.forward(a);
  CHECK_FALSE(std::isnan(wide[0]));
}

TEST_CASE("block sizes near 2^63 count their blocks without overflow and give dense attention") {
  for (const std::int64_t block : {std::int64_t{1} << 62, std::numeric_limits<std::int64_t>::max() - 1,
                                   std::numeric_limits<std::int64_t>::max()}) {
    CAPTURE(block);
    CHECK(moba::core::block_count(14, block) == 1);
    CHECK(moba::core::block_end(0, block, 14) == 14);
    problem p;
    p.cfg.block_size = block;
    const auto want = moba::test::run<moba::reference, float>(p.t, [] {
      moba::config c;
      c.mode = moba::mode::full;
      return c;
    }());
    const auto got = moba::test::run<moba::reference, float>(p.t, p.cfg);
    CHECK(moba::test::rel_error(got.out, want.out) <= moba::test::output_bound<float>());
    const auto cpu = moba::test::run<moba::cpu, float>(p.t, p.cfg);
    CHECK(moba::test::rel_error(cpu.out, want.out) <= moba::test::output_bound<float>());
  }
}

TEST_CASE("top_k far above the blocks that exist needs a selection only as wide as those blocks") {
  problem p;
  p.cfg.top_k = std::int64_t{1} << 40;
  auto a = p.args();  // selected has width 2; 14 keys in blocks of 4 make at most 4 blocks
  std::vector<std::int32_t> wide(total * hq * 4, -7);
  a.selected = moba::selection(wide.data(), 1, total, hq, 4);
  moba::attention<moba::reference, float> attn(p.cfg);
  attn.forward(a);
  CHECK(wide[(total - 1) * hq * 4 + 3] == 3);  // the last query selects blocks 0..3
  a.selected = moba::selection(wide.data(), 1, total, hq, 3);
  CHECK_THROWS_WITH_AS(attn.forward(a), doctest::Contains("selected width = 3 cannot hold the 4 blocks"),
                       moba::invalid_argument);
}

TEST_CASE("view helpers refuse extents whose product overflows instead of building wrapped strides") {
  float* none = nullptr;
  const std::int64_t big = std::int64_t{1} << 32;
  CHECK_THROWS_WITH_AS(moba::bshd(none, big, big, 2, 2), doctest::Contains("moba::bshd: the product of the extents overflows"),
                       moba::invalid_argument);
  CHECK_THROWS_WITH_AS(moba::packed(none, big << 8, big, 4), doctest::Contains("moba::packed"), moba::invalid_argument);
  CHECK_THROWS_WITH_AS(moba::bhsd(none, 2, big, big, 2), doctest::Contains("moba::bhsd"), moba::invalid_argument);
  CHECK_THROWS_WITH_AS(moba::bsh(none, big, big, 2), doctest::Contains("moba::bsh"), moba::invalid_argument);
  CHECK_THROWS_WITH_AS(moba::selection(static_cast<std::int32_t*>(nullptr), big, big, 1, 1),
                       doctest::Contains("moba::selection"), moba::invalid_argument);
  CHECK_THROWS_WITH_AS(moba::bshd(none, 1, -1, 2, 2), doctest::Contains("extents must be >= 0"), moba::invalid_argument);
  // The largest shape that fits is built with the strides of its layout.
  const auto v = moba::bhsd(none, 2, 3, 5, 7);
  CHECK((v.stride[0] == 105 && v.stride[1] == 7 && v.stride[2] == 35 && v.stride[3] == 1));
}

TEST_CASE("softmax_scale beyond the range the fast backends compute in is refused, with its value") {
  for (const double scale : {1e38, -1e5, 65536.5}) {
    moba::config cfg;
    cfg.softmax_scale = scale;
    CAPTURE(scale);
    CHECK_THROWS_WITH_AS(cpu_float{cfg}, doctest::Contains("|softmax_scale| <= 65536"),
                         moba::invalid_argument);
  }
  moba::config ok;
  ok.softmax_scale = -65536;
  CHECK_NOTHROW(cpu_float{ok});
}

TEST_CASE("decode: outputs holding the page table or the lengths, and two sequences writing one slot, are refused") {
  constexpr std::int64_t batch = 2, pages = 4, page_size = 4, blocks = 4;
  std::mt19937_64 rng(moba::test::fresh_seed());
  auto q = moba::test::random_values<float>(batch * hq * d, rng);
  auto kn = moba::test::random_values<float>(batch * hkv * d, rng), vn = kn;
  std::vector<float> kp(pages * page_size * hkv * d, 0.5f), vp = kp, sums(batch * blocks * hkv * d, 0.f);
  std::vector<float> out(batch * hq * d + 16, NAN);
  std::vector<std::int32_t> table{0, 1, 2, 3}, seqlens{3, 2};
  moba::config cfg;
  cfg.block_size = 4;
  auto args = [&] {
    return moba::decode_args<float>{.q = moba::bshd<const float>(q.data(), batch, 1, hq, d),
                                    .k_new = moba::bshd<const float>(kn.data(), batch, 1, hkv, d),
                                    .v_new = moba::bshd<const float>(vn.data(), batch, 1, hkv, d),
                                    .cache = {moba::bshd(kp.data(), pages, page_size, hkv, d),
                                              moba::bshd(vp.data(), pages, page_size, hkv, d),
                                              {sums.data(), {batch, blocks, hkv, d}, {blocks * hkv * d, hkv * d, d, 1}},
                                              {table.data(), {batch, 2}, {2, 1}},
                                              seqlens},
                                    .out = moba::bshd(out.data(), batch, 1, hq, d)};
  };
  moba::attention<moba::reference, float> attn(cfg);
  auto lse_over = [](auto* p) { return moba::bsh(reinterpret_cast<float*>(p), batch, 1, hq); };
  auto a = args();
  a.lse = lse_over(table.data());
  CHECK_THROWS_WITH_AS(attn.decode(a), doctest::Contains("overlaps input cache.page_table"), moba::invalid_argument);
  a = args();
  a.lse = lse_over(seqlens.data());
  CHECK_THROWS_WITH_AS(attn.decode(a), doctest::Contains("overlaps input cache.seqlens"), moba::invalid_argument);
  a = args();
  a.out.stride[0] = 0;
  CHECK_THROWS_WITH_AS(attn.decode(a), doctest::Contains("out overlaps itself"), moba::invalid_argument);
  table = {0, 1, 0, 1};  // both sequences' page 0 is page 0; slots 3 and 2 differ, so this is valid
  CHECK_NOTHROW(attn.decode(args()));
  seqlens = {3, 3};  // now both would write page 0, slot 3
  std::fill(out.begin(), out.end(), NAN);
  CHECK_THROWS_WITH_AS(attn.decode(args()), doctest::Contains("would write the same cache slot (page 0, slot 3)"),
                       moba::invalid_argument);
  for (float x : out) CHECK(std::isnan(x));
}
