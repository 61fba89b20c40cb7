// SPDX-License-Identifier: MIT
/// @file quickstart_cuda: MoBA on the GPU (bf16, one stream, a caller workspace) beside dense causal
/// attention (mode full) through the same API. Prints both times, their TFLOP/s on attended pairs,
/// and how far the sparse output is from the dense one. Usage: quickstart_cuda [tokens]
#include <moba/moba.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using T = moba::bfloat16;

/// A device copy of `host`, freed at scope exit.
struct device_buffer {
  T* data = nullptr;
  explicit device_buffer(const std::vector<T>& host) {
    MOBA_CUDA_CHECK(cudaMalloc(&data, host.size() * sizeof(T)));
    MOBA_CUDA_CHECK(cudaMemcpy(data, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  device_buffer(const device_buffer&) = delete;
  ~device_buffer() { cudaFree(data); }
};

/// A stream, destroyed at scope exit: declared before the attention objects, it outlives them (their
/// destructors free their workspace on it).
struct stream_owner {
  cudaStream_t stream = nullptr;
  stream_owner() { MOBA_CUDA_CHECK(cudaStreamCreate(&stream)); }
  stream_owner(const stream_owner&) = delete;
  ~stream_owner() { cudaStreamDestroy(stream); }
};

int main(int argc, char** argv) try {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("quickstart_cuda: no CUDA device\n");
    return 77;
  }
  // One sequence of n tokens, GQA with 4 query heads per kv head; the paper's B = 512, top-k 3.
  const std::int64_t n = argc > 1 ? std::atoll(argv[1]) : 32768, heads = 16, kv_heads = 4, dim = 128;
  moba::config cfg;
  cfg.block_size = 512;
  cfg.top_k = 3;

  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal;
  auto random = [&](std::int64_t count) {
    std::vector<T> x(count);
    for (auto& e : x) e = T(normal(rng));
    return x;
  };
  const device_buffer q(random(n * heads * dim)), k(random(n * kv_heads * dim)), v(random(n * kv_heads * dim));
  const device_buffer sparse_out(std::vector<T>(n * heads * dim)), dense_out(std::vector<T>(n * heads * dim));

  const stream_owner owner;
  const cudaStream_t stream = owner.stream;
  const moba::forward_args<T> sparse_args{.q = moba::packed(q.data, n, heads, dim),
                                          .k = moba::packed(k.data, n, kv_heads, dim),
                                          .v = moba::packed(v.data, n, kv_heads, dim),
                                          .out = moba::packed(sparse_out.data, n, heads, dim)};
  moba::attention<moba::cuda, T> sparse(cfg, stream);
  // The backend grows a workspace of its own; this one runs in memory the caller owns instead.
  const std::int64_t workspace_bytes = sparse.workspace_size(sparse_args);
  void* workspace = nullptr;
  MOBA_CUDA_CHECK(cudaMalloc(&workspace, workspace_bytes));
  sparse.backend().set_workspace(workspace, workspace_bytes);

  moba::config full_cfg = cfg;
  full_cfg.mode = moba::mode::full;
  moba::attention<moba::cuda, T> dense(full_cfg, stream);
  moba::forward_args<T> dense_args = sparse_args;
  dense_args.out = moba::packed(dense_out.data, n, heads, dim);

  cudaEvent_t start, stop;
  MOBA_CUDA_CHECK(cudaEventCreate(&start));
  MOBA_CUDA_CHECK(cudaEventCreate(&stop));
  auto timed_ms = [&](auto& attn, const moba::forward_args<T>& args) {
    attn.forward(args);  // warm-up: first launches, the owned workspace
    MOBA_CUDA_CHECK(cudaEventRecord(start, stream));
    attn.forward(args);
    MOBA_CUDA_CHECK(cudaEventRecord(stop, stream));
    MOBA_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MOBA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return double(ms);
  };
  const double sparse_ms = timed_ms(sparse, sparse_args), dense_ms = timed_ms(dense, dense_args);

  std::vector<T> s(n * heads * dim), d(n * heads * dim);
  MOBA_CUDA_CHECK(cudaMemcpy(s.data(), sparse_out.data, s.size() * sizeof(T), cudaMemcpyDeviceToHost));
  MOBA_CUDA_CHECK(cudaMemcpy(d.data(), dense_out.data, d.size() * sizeof(T), cudaMemcpyDeviceToHost));
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const double a = moba::to_double(s[i]), b = moba::to_double(d[i]);
    diff += (a - b) * (a - b);
    norm += b * b;
  }

  cudaDeviceProp prop{};
  MOBA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const std::int64_t sparse_pairs = moba::core::attended_pairs(n, n, cfg.block_size, cfg.top_k, false);
  const std::int64_t dense_pairs = moba::core::attended_pairs(n, n, cfg.block_size, cfg.top_k, true);
  std::printf("moba %s quickstart on moba::cuda (%s): N = %lld tokens, Hq = %lld, Hkv = %lld, D = %lld, B = %lld, top-k = %lld, bf16\n",
              moba::version_string, prop.name, static_cast<long long>(n), static_cast<long long>(heads),
              static_cast<long long>(kv_heads), static_cast<long long>(dim), static_cast<long long>(cfg.block_size),
              static_cast<long long>(cfg.top_k));
  std::printf("attended pairs per head: sparse %lld, dense %lld -> sparsity %.1f%%\n", static_cast<long long>(sparse_pairs),
              static_cast<long long>(dense_pairs), 100.0 * (1.0 - double(sparse_pairs) / double(dense_pairs)));
  std::printf("caller workspace: %.1f MB\n", workspace_bytes * 1e-6);
  std::printf("relative difference from dense causal attention: %.3f\n"
              "  (large on random inputs, where the blocks a query skips weigh as much as those it keeps)\n",
              std::sqrt(diff / norm));
  std::printf("time: sparse %.3f ms (%.0f TFLOP/s), dense %.3f ms (%.0f TFLOP/s), speed-up %.2fx\n", sparse_ms,
              moba::core::forward_flops(sparse_pairs * heads, dim) / sparse_ms * 1e-9, dense_ms,
              moba::core::forward_flops(dense_pairs * heads, dim) / dense_ms * 1e-9, dense_ms / sparse_ms);

  MOBA_CUDA_CHECK(cudaEventDestroy(start));
  MOBA_CUDA_CHECK(cudaEventDestroy(stop));
  MOBA_CUDA_CHECK(cudaFree(workspace));  // no call runs in it any more (the stream has been synchronised)
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "quickstart_cuda: %s\n", e.what());
  return 1;
}
