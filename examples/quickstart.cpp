// SPDX-License-Identifier: MIT
/// @file quickstart: MoBA beside dense causal attention through the same API, on two inputs: random
/// ones, where no block matters more than another, and ones with planted structure that the gate can
/// find, where sparse attention is close to dense while computing a fraction of the pairs.
#include <moba/moba.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#if __has_include(<moba/backends/cpu/forward.hpp>)
using backend = moba::cpu;
static const char* backend_name = "moba::cpu";
#else
using backend = moba::reference;
static const char* backend_name = "moba::reference";
#endif

namespace {

constexpr std::int64_t heads = 4, kv_heads = 2, dim = 64;

struct problem {
  std::vector<float> q, k, v;
  std::vector<std::int32_t> planted;  // per (token, head): the history blocks its query points at, -1 padded
};

struct result {
  double diff = 0, sparse_s = 0, dense_s = 0, found = -1;  // found: share of rows that chose the planted blocks
};

double seconds_of(auto&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Sparse and dense forward on one problem: their relative difference, times, and how often the gate
/// chose exactly the planted history blocks.
result compare(const problem& p, std::int64_t n, const moba::config& cfg) {
  std::vector<float> sparse_out(p.q.size()), dense_out(p.q.size());
  std::vector<std::int32_t> selected(n * heads * cfg.top_k);
  const auto args = [&](std::vector<float>& out) {
    return moba::forward_args<float>{.q = moba::packed(p.q.data(), n, heads, dim),
                                     .k = moba::packed(p.k.data(), n, kv_heads, dim),
                                     .v = moba::packed(p.v.data(), n, kv_heads, dim),
                                     .out = moba::packed(out.data(), n, heads, dim)};
  };
  moba::attention<backend, float> sparse(cfg);
  moba::config full_cfg = cfg;
  full_cfg.mode = moba::mode::full;
  moba::attention<backend, float> dense(full_cfg);
  result r;
  r.sparse_s = seconds_of([&] {
    auto a = args(sparse_out);
    a.selected = moba::selection(selected.data(), 1, n, heads, cfg.top_k);
    sparse.forward(a);
  });
  r.dense_s = seconds_of([&] { dense.forward(args(dense_out)); });
  double num = 0, den = 0;
  for (std::size_t i = 0; i < p.q.size(); ++i) {
    num += (sparse_out[i] - dense_out[i]) * (sparse_out[i] - dense_out[i]);
    den += dense_out[i] * dense_out[i];
  }
  r.diff = std::sqrt(num / den);
  if (!p.planted.empty()) {
    std::int64_t same = 0;
    for (std::int64_t row = 0; row < n * heads; ++row) {
      const std::int64_t c = row / heads / cfg.block_size;  // selected: ascending, the current block last
      std::vector<std::int32_t> want(p.planted.begin() + row * (cfg.top_k - 1), p.planted.begin() + (row + 1) * (cfg.top_k - 1));
      want.push_back(static_cast<std::int32_t>(c));
      std::sort(want.begin(), want.end(), [](auto a, auto b) { return (a < 0) != (b < 0) ? b < 0 : a < b; });
      same += std::equal(want.begin(), want.end(), selected.begin() + row * cfg.top_k);
    }
    r.found = static_cast<double>(same) / static_cast<double>(n * heads);
  }
  return r;
}

/// Keys of block j lean towards a direction of their own (one axis per block of a kv head); each
/// query adds the directions of top_k − 1 past blocks chosen at random for its block and head, so
/// those blocks' mean keys score highest and hold nearly all of its attention.
problem planted(std::int64_t n, const moba::config& cfg, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  const std::int64_t blocks = moba::core::block_count(n, cfg.block_size), group = heads / kv_heads;
  const float strength = 8;  // q·k of a planted pair ≈ 64, 8 after the 1/sqrt(64) scale: e^8 over the others
  std::vector<std::vector<std::int64_t>> axis(kv_heads, std::vector<std::int64_t>(blocks));
  for (auto& a : axis) {
    std::iota(a.begin(), a.end(), 0);
    std::shuffle(a.begin(), a.end(), rng);
    for (auto& x : a) x %= dim;  // orthogonal while blocks <= dim (N <= 16384 here); past that, blocks share one
  }
  problem p;
  p.k.resize(n * kv_heads * dim);
  p.v.resize(n * kv_heads * dim);
  for (auto& x : p.v) x = normal(rng);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      float* key = &p.k[(t * kv_heads + h) * dim];
      for (std::int64_t e = 0; e < dim; ++e) key[e] = normal(rng);
      key[axis[h][t / cfg.block_size]] += strength;
    }
  p.q.assign(n * heads * dim, 0);
  p.planted.assign(n * heads * (cfg.top_k - 1), -1);
  std::vector<std::int64_t> past;
  for (std::int64_t c = 0; c < blocks; ++c)
    for (std::int64_t h = 0; h < heads; ++h) {
      past.resize(c);
      std::iota(past.begin(), past.end(), 0);
      std::shuffle(past.begin(), past.end(), rng);
      past.resize(std::min<std::int64_t>(c, cfg.top_k - 1));
      for (std::int64_t t = c * cfg.block_size; t < std::min(n, (c + 1) * cfg.block_size); ++t) {
        float* query = &p.q[(t * heads + h) * dim];
        for (std::int64_t e = 0; e < dim; ++e) query[e] = 0.5f * normal(rng);
        for (std::size_t w = 0; w < past.size(); ++w) {
          query[axis[h / group][past[w]]] += strength;
          p.planted[(t * heads + h) * (cfg.top_k - 1) + w] = static_cast<std::int32_t>(past[w]);
        }
      }
    }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  // One sequence of n tokens; change with `quickstart N`.
  const std::int64_t n = argc > 1 ? std::atoll(argv[1]) : 4096;
  if (n < 1) return std::fprintf(stderr, "usage: quickstart [tokens >= 1]\n"), 2;
  moba::config cfg;
  cfg.block_size = 256;
  cfg.top_k = 3;

  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal;
  problem random;
  for (auto [x, count] : {std::pair{&random.q, n * heads * dim}, {&random.k, n * kv_heads * dim}, {&random.v, n * kv_heads * dim}}) {
    x->resize(count);
    for (auto& e : *x) e = normal(rng);
  }
  const result r = compare(random, n, cfg);
  const result s = compare(planted(n, cfg, rng), n, cfg);

  const std::int64_t sparse_pairs = moba::core::attended_pairs(n, n, cfg.block_size, cfg.top_k, false);
  const std::int64_t dense_pairs = moba::core::attended_pairs(n, n, cfg.block_size, cfg.top_k, true);
  std::printf("moba %s quickstart on %s: N = %lld tokens, Hq = %lld, Hkv = %lld, D = %lld, B = %lld, top-k = %lld\n",
              moba::version_string, backend_name, static_cast<long long>(n), static_cast<long long>(heads),
              static_cast<long long>(kv_heads), static_cast<long long>(dim), static_cast<long long>(cfg.block_size),
              static_cast<long long>(cfg.top_k));
  std::printf("sparse attention computes %lld of dense causal attention's %lld query-key pairs per head (%.1f%%)\n\n",
              static_cast<long long>(sparse_pairs), static_cast<long long>(dense_pairs),
              100.0 * static_cast<double>(sparse_pairs) / static_cast<double>(dense_pairs));
  const auto times = [&](const result& x) {
    std::printf("  time: sparse %.3f s (%.2f GFLOP/s), dense %.3f s (%.2f GFLOP/s), speed-up %.2fx\n", x.sparse_s,
                moba::core::forward_flops(sparse_pairs * heads, dim) / x.sparse_s * 1e-9, x.dense_s,
                moba::core::forward_flops(dense_pairs * heads, dim) / x.dense_s * 1e-9, x.dense_s / x.sparse_s);
  };
  std::printf("random q, k, v: relative difference from dense %.3f\n"
              "  no block matters more than another, so the blocks a query skips weigh as much as those it keeps.\n",
              r.diff);
  times(r);
  std::printf("planted blocks: relative difference from dense %.4f; the gate chose the planted blocks in %.1f%% of rows\n"
              "  each query points at the mean keys of %lld past blocks, which the gate finds and where nearly all its "
              "attention lies.\n",
              s.diff, 100.0 * s.found, static_cast<long long>(cfg.top_k - 1));
  times(s);
  return 0;
}
