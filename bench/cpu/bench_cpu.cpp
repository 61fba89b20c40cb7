// SPDX-License-Identifier: MIT
/// @file moba_bench: the machine's FMA (and bf16 dot-product) peak, and the CPU forward and backward.
/// Every benchmark reports `flops`, a rate: for attention, attended query-key pairs × 4·D per second
/// forward, × 2.5 · 4·D backward (core/flops.hpp; gating is in the time, not in the count). `train`
/// (forward + backward) reports the backward's FLOPs over the whole time: read its milliseconds.
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

/// A single sequence of n tokens on random inputs, with everything forward and backward write.
template <class T>
struct problem {
  std::int64_t n, heads, d;
  std::vector<T> q, k, v, out, dout, dq, dk, dv;
  std::vector<float> lse;
  std::vector<std::int32_t> selected;
  std::int64_t width;
  std::vector<std::int32_t> cu;

  problem(std::int64_t n_, std::int64_t heads_, std::int64_t d_, const moba::config& cfg)
      : n(n_), heads(heads_), d(d_), q(n * heads * d), k(q.size()), v(q.size()), out(q.size()), dout(q.size()),
        dq(q.size()), dk(q.size()), dv(q.size()), lse(n * heads), cu{0, static_cast<std::int32_t>(n)} {
    std::mt19937_64 rng(1);
    std::normal_distribution<float> normal;
    for (auto* x : {&q, &k, &v, &dout})
      for (auto& e : *x) e = static_cast<T>(normal(rng));
    const std::int64_t blocks = moba::core::block_count(n, cfg.block_size);
    width = cfg.mode == moba::mode::full ? blocks : std::min<std::int64_t>(cfg.top_k, blocks);
    selected.resize(n * heads * width);
  }
  moba::forward_args<T> forward_args(bool with_selected) {
    return {.q = moba::packed<const T>(q.data(), n, heads, d),
            .k = moba::packed<const T>(k.data(), n, heads, d),
            .v = moba::packed<const T>(v.data(), n, heads, d),
            .out = moba::packed(out.data(), n, heads, d),
            .lse = moba::bsh(lse.data(), 1, n, heads),
            .selected = with_selected ? moba::selection(selected.data(), 1, n, heads, width) : moba::tensor_view<std::int32_t, 4>{},
            .cu_seqlens_q = cu,
            .cu_seqlens_k = cu};
  }
  moba::backward_args<T> backward_args() {
    return {.q = moba::packed<const T>(q.data(), n, heads, d),
            .k = moba::packed<const T>(k.data(), n, heads, d),
            .v = moba::packed<const T>(v.data(), n, heads, d),
            .out = moba::packed<const T>(out.data(), n, heads, d),
            .dout = moba::packed<const T>(dout.data(), n, heads, d),
            .lse = moba::bsh<const float>(lse.data(), 1, n, heads),
            .dq = moba::packed(dq.data(), n, heads, d),
            .dk = moba::packed(dk.data(), n, heads, d),
            .dv = moba::packed(dv.data(), n, heads, d),
            .cu_seqlens_q = cu,
            .cu_seqlens_k = cu,
            .selection = moba::selection<const std::int32_t>(selected.data(), 1, n, heads, width)};
  }
};

enum class pass { forward, backward, train };

/// One pass over a problem: the forward; the backward alone (the forward's lse and selection
/// given); or train, a forward writing lse and selection followed by the backward that takes them.
template <class T>
void run_pass(benchmark::State& state, pass what, std::int64_t n, std::int64_t heads, std::int64_t d,
              std::int64_t block, std::int64_t top_k, moba::mode mode, int threads) {
  moba::config cfg;
  cfg.block_size = block;
  cfg.top_k = top_k;
  cfg.mode = mode;
  problem<T> x(n, heads, d, cfg);
  moba::attention<moba::cpu, T> attn(cfg, moba::backends::cpu::options{threads});
  if (what == pass::backward) attn.forward(x.forward_args(true));
  for (auto _ : state) {
    if (what != pass::backward) attn.forward(x.forward_args(what == pass::train));
    if (what != pass::forward) attn.backward(x.backward_args());
    benchmark::ClobberMemory();
  }
  const std::int64_t pairs = moba::core::attended_pairs(n, n, block, top_k, mode == moba::mode::full) * heads;
  const double flops = what == pass::forward ? moba::core::forward_flops(pairs, d) : moba::core::backward_flops(pairs, d);
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void forward(benchmark::State& state, std::int64_t n, std::int64_t heads, std::int64_t d, std::int64_t block,
             std::int64_t top_k, moba::mode mode, int threads) {
  run_pass<T>(state, pass::forward, n, heads, d, block, top_k, mode, threads);
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
        if (b != 512) continue;
        for (const pass what : {pass::backward, pass::train}) {
          const std::string name = what == pass::backward ? "/backward" : "/train";
          benchmark::RegisterBenchmark(("cpu/f32" + name + shape).c_str(), run_pass<float>, what, n, h, d, b, k,
                                       moba::mode::sparse, t)
              ->UseRealTime()->Unit(benchmark::kMillisecond);
          benchmark::RegisterBenchmark(("cpu/bf16" + name + shape).c_str(), run_pass<moba::bfloat16>, what, n, h, d, b, k,
                                       moba::mode::sparse, t)
              ->UseRealTime()->Unit(benchmark::kMillisecond);
        }
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
