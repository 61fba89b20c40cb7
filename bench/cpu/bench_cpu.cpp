// SPDX-License-Identifier: MIT
/// @file moba_bench: the machine's FMA (and bf16 dot-product) peak, and the CPU forward pass.
/// Every benchmark reports `flops`, a rate: for attention, attended query-key pairs × 4·D per second
/// (core/flops.hpp; gating is in the time, not in the count).
#include <benchmark/benchmark.h>

#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>

#include <random>
#include <string>
#include <vector>

#include <moba/moba.hpp>
#include <xsimd/xsimd.hpp>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr std::int64_t peak_iterations = 1 << 22;

/// Independent FMA chains in registers, one set per thread: the fp32 FMA throughput ceiling.
void peak_f32(benchmark::State& state, int threads) {
  using batch = xsimd::batch<float>;
  tbb::task_arena arena(threads);
  for (auto _ : state) {
    arena.execute([&] {
      tbb::parallel_for(0, threads, [&](int) {
        batch acc[12];
        for (int i = 0; i < 12; ++i) acc[i] = batch(1.0f + i * 1e-3f);
        const batch a(0.999999f), b(1e-7f);
        for (std::int64_t it = 0; it < peak_iterations; ++it)
          for (auto& x : acc) x = xsimd::fma(x, a, b);
        float sum = 0;
        for (auto& x : acc) sum += xsimd::hadd(x);
        benchmark::DoNotOptimize(sum);
      }, tbb::static_partitioner());
    });
  }
  state.counters["flops"] = benchmark::Counter(2.0 * 12 * batch::size * peak_iterations * threads,
                                               benchmark::Counter::kIsIterationInvariantRate);
}

#if defined(__AVX512BF16__)
/// AVX512-BF16 dot products (vdpbf16ps: 32 bf16 products summed into 16 floats, 64 FLOPs).
void peak_bf16(benchmark::State& state, int threads) {
  tbb::task_arena arena(threads);
  for (auto _ : state) {
    arena.execute([&] {
      tbb::parallel_for(0, threads, [&](int) {
        __m512 acc[12];
        for (auto& x : acc) x = _mm512_setzero_ps();
        const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
        for (std::int64_t it = 0; it < peak_iterations; ++it)
          for (auto& x : acc) x = _mm512_dpbf16_ps(x, a, a);
        float sum = 0;
        for (auto& x : acc) sum += _mm512_reduce_add_ps(x);
        benchmark::DoNotOptimize(sum);
      }, tbb::static_partitioner());
    });
  }
  state.counters["flops"] =
      benchmark::Counter(64.0 * 12 * peak_iterations * threads, benchmark::Counter::kIsIterationInvariantRate);
}
#endif

/// One forward pass of a single sequence of n tokens on random inputs.
template <class T>
void forward(benchmark::State& state, std::int64_t n, std::int64_t heads, std::int64_t d, std::int64_t block,
             std::int64_t top_k, moba::mode mode, int threads) {
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  std::vector<T> q(n * heads * d), k(q.size()), v(q.size()), out(q.size());
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = static_cast<T>(normal(rng));
  const std::vector<std::int32_t> cu{0, static_cast<std::int32_t>(n)};
  moba::config cfg;
  cfg.block_size = block;
  cfg.top_k = top_k;
  cfg.mode = mode;
  moba::attention<moba::cpu, T> attn(cfg, moba::backends::cpu::options{threads});
  const moba::forward_args<T> args{.q = moba::packed(q.data(), n, heads, d),
                                   .k = moba::packed(k.data(), n, heads, d),
                                   .v = moba::packed(v.data(), n, heads, d),
                                   .out = moba::packed(out.data(), n, heads, d),
                                   .cu_seqlens_q = cu,
                                   .cu_seqlens_k = cu};
  for (auto _ : state) {
    attn.forward(args);
    benchmark::ClobberMemory();
  }
  const std::int64_t pairs = moba::core::attended_pairs(n, n, block, top_k, mode == moba::mode::full) * heads;
  state.counters["flops"] =
      benchmark::Counter(moba::core::forward_flops(pairs, d), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  for (int t : {1, 2}) {
    benchmark::RegisterBenchmark(("peak/f32/T=" + std::to_string(t)).c_str(), peak_f32, t)->UseRealTime();
#if defined(__AVX512BF16__)
    benchmark::RegisterBenchmark(("peak/bf16/T=" + std::to_string(t)).c_str(), peak_bf16, t)->UseRealTime();
#endif
  }
  const std::int64_t h = 8, d = 128, k = 3;
  for (std::int64_t n : {8192, 32768}) {
    std::vector<std::int64_t> blocks{512};
    if (n / 64 != 512) blocks.push_back(n / 64);  // at N = 32768, B = N/64 is B = 512
    for (std::int64_t b : blocks) {
      for (int t : {1, 2}) {
        const std::string shape = "/N=" + std::to_string(n) + "/H=8/D=128/B=" + std::to_string(b) + "/K=3/T=" + std::to_string(t);
        benchmark::RegisterBenchmark(("cpu/f32/sparse" + shape).c_str(), forward<float>, n, h, d, b, k, moba::mode::sparse, t)
            ->UseRealTime()->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("cpu/bf16/sparse" + shape).c_str(), forward<moba::bfloat16>, n, h, d, b, k,
                                     moba::mode::sparse, t)
            ->UseRealTime()->Unit(benchmark::kMillisecond);
        if (b == 512)
          benchmark::RegisterBenchmark(("cpu/f32/full" + shape).c_str(), forward<float>, n, h, d, b, k, moba::mode::full, t)
              ->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1);
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
