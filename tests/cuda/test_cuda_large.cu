// SPDX-License-Identifier: MIT
/// @file moba::cuda beyond the shared suite: thousands of tokens (several query ranges, gathered
/// tiles, many gate tiles, a three-level ranking heap at top_k = 40, blocks of four key tiles as in
/// the 32K benchmark), head dims 64 and 128, and the stream / workspace options.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "conformance/forward.hpp"
#include "cuda/device_runner.hpp"

namespace {

template <class T>
void large_cases() {
  using moba::test::expect_matches_reference;
  for (const std::int64_t d : {64, 128}) {
    for (const auto& [block, top_k, full] :
         {std::tuple{64, 3, false}, {16, 8, false}, {16, 40, false}, {128, 5, false}, {512, 3, false}, {256, 3, true}}) {
      moba::config cfg;
      cfg.block_size = block;
      cfg.top_k = top_k;
      cfg.mode = full ? moba::mode::full : moba::mode::sparse;
      // One prefill of 2500 tokens and one chunk of 1100 queries at the end of 2900 keys; GQA 4:2.
      expect_matches_reference<moba::cuda, T>({{2500, 1100}, {2500, 2900}, 4, 2, d}, cfg);
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("moba::cuda: thousands of tokens match the float64 reference (ranges, gathered tiles, many blocks)", T,
                   float, moba::float16, moba::bfloat16) {
  large_cases<T>();
}

TEST_CASE("moba::cuda: float keys whose rows are only 4-byte aligned give the packed layout's result") {
  using T = float;  // check() asks 16-byte rows of bf16/f16 only, so float kernels read keys 4 bytes at a time
  const std::int64_t n = 600, hq = 2, hkv = 1, d = 64, pitch = hkv * d + 1;
  const auto t = moba::test::random_tensors<T>({{n}, {n}, hq, hkv, d}, moba::test::fresh_seed());
  moba::config cfg;
  cfg.block_size = 64;
  cfg.top_k = 3;
  const auto want = moba::test::run<moba::cuda, T>(t, cfg);
  std::vector<T> k(n * pitch, moba::test::poison_value<T>());
  for (std::int64_t s = 0; s < n; ++s)
    std::memcpy(&k[s * pitch], &t.k[s * hkv * d], hkv * d * sizeof(T));
  std::vector<T> out(t.q.size(), moba::test::poison_value<T>());
  moba::test::device_copy dq(t.q_view()), dv(t.v_view());
  moba::test::device_copy dk(moba::view4<const T>{k.data(), {1, n, hkv, d}, {n * pitch, pitch, d, 1}});
  moba::test::device_copy dout(moba::packed(out.data(), n, hq, d));
  moba::attention<moba::cuda, T> attn(cfg);
  attn.forward({.q = dq.view(), .k = dk.view(), .v = dv.view(), .out = dout.view(), .cu_seqlens_q = t.cu_q, .cu_seqlens_k = t.cu_k});
  MOBA_CUDA_CHECK(cudaDeviceSynchronize());
  dout.copy_back();
  CHECK(moba::test::rel_error(out, want.out) <= moba::test::output_bound<T>());
}

TEST_CASE("moba::cuda: a caller workspace and a stream give the same result; a small workspace throws") {
  using T = moba::bfloat16;
  const auto t = moba::test::random_tensors<T>({{700}, {700}, 2, 1, 128}, moba::test::fresh_seed());
  moba::config cfg;
  cfg.block_size = 32;
  cfg.top_k = 4;
  const auto want = moba::test::run<moba::cuda, T>(t, cfg);

  cudaStream_t stream = nullptr;
  MOBA_CUDA_CHECK(cudaStreamCreate(&stream));
  moba::attention<moba::cuda, T> attn(cfg, stream);
  std::vector<T> out(t.q.size(), moba::test::poison_value<T>());
  moba::test::device_copy q(t.q_view()), k(t.k_view()), v(t.v_view());
  moba::test::device_copy o(moba::packed(out.data(), 700, 2, 128));
  moba::forward_args<T> args{.q = q.view(), .k = k.view(), .v = v.view(), .out = o.view(),
                             .cu_seqlens_q = t.cu_q, .cu_seqlens_k = t.cu_k};
  const std::int64_t need = attn.workspace_size(args);
  CHECK(need > 0);
  moba::forward_args<T> wrong_dim = args;  // validated as forward's: out's head dim is not q's
  wrong_dim.out = moba::packed(o.view().data, 700, 2, 64);
  CHECK_THROWS_AS(attn.workspace_size(wrong_dim), std::invalid_argument);
  void* ws = nullptr;
  MOBA_CUDA_CHECK(cudaMalloc(&ws, need));
  attn.backend().set_workspace(ws, need - 256);
  CHECK_THROWS_AS(attn.forward(args), std::invalid_argument);
  attn.backend().set_workspace(ws, need);
  attn.forward(args);
  MOBA_CUDA_CHECK(cudaStreamSynchronize(stream));
  o.copy_back();
  CHECK(moba::test::rel_error(out, want.out) == 0.0);  // same kernels, same inputs: bitwise equal
  MOBA_CUDA_CHECK(cudaFree(ws));
  MOBA_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_CASE("moba::cuda: a misaligned out throws before anything is written") {
  using T = moba::bfloat16;
  const auto t = moba::test::random_tensors<T>({{300}, {300}, 2, 1, 64}, moba::test::fresh_seed());
  moba::config cfg;
  cfg.block_size = 32;
  cfg.top_k = 3;
  moba::attention<moba::cuda, T> attn(cfg);
  moba::test::device_copy q(t.q_view()), k(t.k_view()), v(t.v_view());
  // out one element past a 16-byte boundary: its rows cannot be stored in 16-byte chunks.
  const std::vector<T> poison(t.q.size() + 8, moba::test::poison_value<T>());
  T* raw = nullptr;
  MOBA_CUDA_CHECK(cudaMalloc(&raw, poison.size() * sizeof(T)));
  MOBA_CUDA_CHECK(cudaMemcpy(raw, poison.data(), poison.size() * sizeof(T), cudaMemcpyHostToDevice));
  const moba::forward_args<T> args{.q = q.view(), .k = k.view(), .v = v.view(), .out = moba::packed(raw + 1, 300, 2, 64),
                                   .cu_seqlens_q = t.cu_q, .cu_seqlens_k = t.cu_k};
  CHECK_THROWS_WITH_AS(attn.forward(args), doctest::Contains("out 16-byte aligned"), std::invalid_argument);
  MOBA_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> after(poison.size());
  MOBA_CUDA_CHECK(cudaMemcpy(after.data(), raw, after.size() * sizeof(T), cudaMemcpyDeviceToHost));
  CHECK(std::memcmp(after.data(), poison.data(), after.size() * sizeof(T)) == 0);
  MOBA_CUDA_CHECK(cudaFree(raw));
}

TEST_CASE("moba::cuda: with 3 CTAs, each running many work items in turn, the bits are those of one CTA per SM") {
  using T = moba::bfloat16;
  for (const std::int64_t d : {64, 128}) {
    // Two sequences, GQA 4:2, several history passes: dozens of work items per launch.
    const auto t = moba::test::random_tensors<T>({{600, 300}, {600, 400}, 4, 2, d}, moba::test::fresh_seed());
    for (const moba::mode m : {moba::mode::sparse, moba::mode::full}) {
      CAPTURE(d);
      moba::config cfg;
      cfg.block_size = 64;
      cfg.top_k = 4;
      cfg.mode = m;
      const auto want = moba::test::run<moba::cuda, T>(t, cfg);
      const auto got = moba::test::run<moba::cuda, T>(t, cfg, 0, [](auto& attn) { attn.backend().set_max_ctas(3); });
      CHECK(moba::test::rel_error(got.out, want.out) == 0.0);
      CHECK(moba::test::rel_error(got.lse, want.lse) == 0.0);
      CHECK(got.selected == want.selected);
    }
  }
  moba::attention<moba::cuda, T> attn(moba::config{});
  CHECK_THROWS_AS(attn.backend().set_max_ctas(-1), std::invalid_argument);
}
