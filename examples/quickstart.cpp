// SPDX-License-Identifier: MIT
/// @file quickstart: MoBA on random data beside dense causal attention through the same API.
/// Prints the selection statistics, the sparsity, the difference from dense, and both times.
#include <moba/moba.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#if __has_include(<moba/backends/cpu/forward.hpp>)
using backend = moba::cpu;
static const char* backend_name = "moba::cpu";
#else
using backend = moba::reference;
static const char* backend_name = "moba::reference";
#endif

int main(int argc, char** argv) {
  // One sequence of n tokens; change with `quickstart N`.
  const std::int64_t n = argc > 1 ? std::atoll(argv[1]) : 4096, heads = 4, kv_heads = 2, dim = 64;
  moba::config cfg;
  cfg.block_size = 256;
  cfg.top_k = 3;

  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal;
  auto random = [&](std::int64_t count) {
    std::vector<float> x(count);
    for (auto& e : x) e = normal(rng);
    return x;
  };
  const auto q = random(n * heads * dim), k = random(n * kv_heads * dim), v = random(n * kv_heads * dim);
  std::vector<float> sparse_out(q.size()), dense_out(q.size()), lse(n * heads);
  std::vector<std::int32_t> selected(n * heads * cfg.top_k);

  auto timed = [](auto&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  moba::attention<backend, float> sparse(cfg);
  const double sparse_s = timed([&] {
    sparse.forward({.q = moba::packed(q.data(), n, heads, dim),
                    .k = moba::packed(k.data(), n, kv_heads, dim),
                    .v = moba::packed(v.data(), n, kv_heads, dim),
                    .out = moba::packed(sparse_out.data(), n, heads, dim),
                    .lse = moba::bsh(lse.data(), 1, n, heads),
                    .selected = moba::selection(selected.data(), 1, n, heads, cfg.top_k)});
  });
  moba::config full_cfg = cfg;
  full_cfg.mode = moba::mode::full;
  moba::attention<backend, float> dense(full_cfg);
  const double dense_s = timed([&] {
    dense.forward({.q = moba::packed(q.data(), n, heads, dim),
                   .k = moba::packed(k.data(), n, kv_heads, dim),
                   .v = moba::packed(v.data(), n, kv_heads, dim),
                   .out = moba::packed(dense_out.data(), n, heads, dim)});
  });

  // How often each history block is chosen, over queries and heads of the last block.
  const std::int64_t blocks = moba::core::block_count(n, cfg.block_size);
  std::vector<std::int64_t> chosen(blocks, 0);
  for (std::int64_t i = (blocks - 1) * cfg.block_size; i < n; ++i)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t w = 0; w < cfg.top_k; ++w)
        if (std::int32_t j = selected[(i * heads + h) * cfg.top_k + w]; j >= 0 && j < blocks - 1) ++chosen[j];

  const std::int64_t sparse_pairs = moba::core::attended_pairs(n, n, cfg.block_size, cfg.top_k, false);
  const std::int64_t dense_pairs = moba::core::attended_pairs(n, n, cfg.block_size, cfg.top_k, true);
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < q.size(); ++i) {
    diff += (sparse_out[i] - dense_out[i]) * (sparse_out[i] - dense_out[i]);
    norm += dense_out[i] * dense_out[i];
  }

  std::printf("moba %s quickstart on %s: N = %lld tokens, Hq = %lld, Hkv = %lld, D = %lld, B = %lld, top-k = %lld\n",
              moba::version_string, backend_name, static_cast<long long>(n), static_cast<long long>(heads),
              static_cast<long long>(kv_heads), static_cast<long long>(dim), static_cast<long long>(cfg.block_size),
              static_cast<long long>(cfg.top_k));
  std::printf("query 0 of the last block, head 0, selected blocks:");
  for (std::int64_t w = 0; w < cfg.top_k; ++w) std::printf(" %d", selected[((blocks - 1) * cfg.block_size * heads) * cfg.top_k + w]);
  std::printf("\nhow often the last block's queries chose each history block:\n");
  for (std::int64_t j = 0; j + 1 < blocks; ++j) std::printf("  block %2lld: %lld\n", static_cast<long long>(j), static_cast<long long>(chosen[j]));
  std::printf("attended pairs per head: sparse %lld, dense %lld -> sparsity %.1f%%\n", static_cast<long long>(sparse_pairs),
              static_cast<long long>(dense_pairs), 100.0 * (1.0 - double(sparse_pairs) / double(dense_pairs)));
  std::printf("relative difference from dense causal attention: %.3f\n"
              "  (large on random inputs, where the blocks a query skips weigh as much as those it keeps)\n",
              std::sqrt(diff / norm));
  std::printf("time: sparse %.3f s (%.2f GFLOP/s), dense %.3f s (%.2f GFLOP/s), speed-up %.2fx\n", sparse_s,
              moba::core::forward_flops(sparse_pairs * heads, dim) / sparse_s * 1e-9, dense_s,
              moba::core::forward_flops(dense_pairs * heads, dim) / dense_s * 1e-9, dense_s / sparse_s);
  return 0;
}
