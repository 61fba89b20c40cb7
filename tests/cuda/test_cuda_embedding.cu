// SPDX-License-Identifier: MIT
/// @file The embeddable call path of moba::cuda: device offsets (also hostile ones), per-call streams
/// and workspaces from two threads, CUDA-graph capture and replay, a selection passed in and gate-only
/// calls. Bitwise properties compare two call paths that must run the same kernels on the same data.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "conformance/forward.hpp"
#include "cuda/device_runner.hpp"

namespace {

using moba::test::device_copy;
using moba::test::poison_value;

template <class X>
bool is_poison(X x) {
  return std::isnan(moba::to_double(x));
}

/// Host offsets copied to the device, with the bounds a caller would pass.
struct device_offsets_copy {
  device_copy<const std::int32_t, 1> q, k;
  std::int64_t batch, max_q, max_k;
  device_offsets_copy(const std::vector<std::int32_t>& cu_q, const std::vector<std::int32_t>& cu_k, std::int64_t max_q,
                      std::int64_t max_k)
      : q(as_view(cu_q)), k(as_view(cu_k)), batch(static_cast<std::int64_t>(cu_q.size()) - 1), max_q(max_q), max_k(max_k) {}
  static moba::tensor_view<const std::int32_t, 1> as_view(const std::vector<std::int32_t>& v) {
    return {v.data(), {static_cast<std::int64_t>(v.size())}, {1}};
  }
  moba::device_offsets get() const { return {q.view().data, k.view().data, batch, max_q, max_k}; }
};

/// Device tensors of one problem and poisoned device outputs; `fetch` copies out and lse back.
template <class T>
struct device_problem {
  moba::test::tensors<T> t;
  std::vector<T> out;
  std::vector<moba::accum_t<T>> lse;
  device_copy<const T, 4> q, k, v;
  device_copy<T, 4> dout;
  device_copy<moba::accum_t<T>, 3> dlse;
  explicit device_problem(const moba::test::tensors<T>& tensors)
      : t(tensors),
        out(t.q.size(), poison_value<T>()),
        lse(t.total_q() * t.s.hq, poison_value<moba::accum_t<T>>()),
        q(t.q_view()),
        k(t.k_view()),
        v(t.v_view()),
        dout(moba::packed(out.data(), t.total_q(), t.s.hq, t.s.d)),
        dlse(moba::bsh(lse.data(), 1, t.total_q(), t.s.hq)) {}
  moba::forward_args<T> args() const {
    return {.q = q.view(), .k = k.view(), .v = v.view(), .out = dout.view(), .lse = dlse.view()};
  }
  moba::forward_args<T> host_offset_args() const {
    auto a = args();
    a.cu_seqlens_q = t.cu_q;
    a.cu_seqlens_k = t.cu_k;
    return a;
  }
  void poison() {
    std::fill(out.begin(), out.end(), poison_value<T>());
    std::fill(lse.begin(), lse.end(), poison_value<moba::accum_t<T>>());
    MOBA_CUDA_CHECK(cudaMemcpy(dout.device, out.data(), out.size() * sizeof(T), cudaMemcpyHostToDevice));
    MOBA_CUDA_CHECK(cudaMemcpy(dlse.device, lse.data(), lse.size() * sizeof(lse[0]), cudaMemcpyHostToDevice));
  }
  void fetch() {
    MOBA_CUDA_CHECK(cudaDeviceSynchronize());
    dout.copy_back();
    dlse.copy_back();
  }
};

/// A device buffer of `bytes`, 256-byte aligned (cudaMalloc's alignment).
struct device_buffer {
  void* data = nullptr;
  std::int64_t bytes;
  explicit device_buffer(std::int64_t n) : bytes(n) { MOBA_CUDA_CHECK(cudaMalloc(&data, static_cast<std::size_t>(n))); }
  device_buffer(const device_buffer&) = delete;
  ~device_buffer() { cudaFree(data); }
};

moba::config sparse(std::int64_t block, std::int64_t top_k) {
  moba::config c;
  c.block_size = block;
  c.top_k = top_k;
  return c;
}

template <class T>
void device_offsets_match_host_offsets() {
  const std::uint64_t seed = moba::test::fresh_seed();
  CAPTURE(seed);
  // A prefill, an empty query range, and a chunk of queries at the end of its keys; GQA 4:2.
  const auto t = moba::test::random_tensors<T>({{700, 0, 300}, {700, 130, 900}, 4, 2, 128}, seed);
  for (const auto& cfg : {sparse(64, 3), sparse(32, 8), [] {
         moba::config c = sparse(128, 3);
         c.mode = moba::mode::full;
         return c;
       }()}) {
    device_problem<T> host(t), dev(t);
    moba::attention<moba::cuda, T> attn(cfg);
    attn.forward(host.host_offset_args());
    host.fetch();
    for (const std::int64_t slack : {0, 1000}) {  // tight and loose bounds give the same bits
      CAPTURE(slack);
      dev.poison();
      const device_offsets_copy offsets(t.cu_q, t.cu_k, 700 + slack, 900 + slack);
      auto a = dev.args();
      a.device_seqlens = offsets.get();
      attn.forward(a);
      dev.fetch();
      CHECK(std::memcmp(dev.out.data(), host.out.data(), host.out.size() * sizeof(T)) == 0);
      CHECK(std::memcmp(dev.lse.data(), host.lse.data(), host.lse.size() * sizeof(host.lse[0])) == 0);
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("moba::cuda: device offsets give the bits of host offsets (tight and loose bounds)", T, moba::bfloat16,
                   moba::float16, float) {
  device_offsets_match_host_offsets<T>();
}

TEST_CASE("moba::cuda: hostile device offsets are clamped into the tensors, never read or written out of bounds") {
  using T = moba::bfloat16;
  const auto t = moba::test::random_tensors<T>({{200, 300}, {300, 400}, 2, 1, 64}, moba::test::fresh_seed());
  const moba::config cfg = sparse(64, 3);
  moba::attention<moba::cuda, T> attn(cfg);
  // Each hostile set, and the valid offsets the kernels must have made of it (a running maximum
  // clamped into [0, tokens]): the two calls give the same bits.
  struct hostile {
    std::vector<std::int32_t> q, k, clamped_q, clamped_k;
  };
  for (const hostile& h : {hostile{{0, 300, 150, 500}, {0, 400, 200, 700}, {0, 300, 300, 500}, {0, 400, 400, 700}},
                           hostile{{-50, 200, 99999}, {-7, 300, 1 << 30}, {0, 200, 500}, {0, 300, 700}}}) {
    device_problem<T> want(t), got(t);
    auto a = want.args();
    a.cu_seqlens_q = h.clamped_q;
    a.cu_seqlens_k = h.clamped_k;
    attn.forward(a);
    want.fetch();
    const device_offsets_copy offsets(h.q, h.k, 500, 700);
    auto b = got.args();
    b.device_seqlens = offsets.get();
    attn.forward(b);
    got.fetch();
    CHECK(std::memcmp(got.out.data(), want.out.data(), want.out.size() * sizeof(T)) == 0);
  }
  // Bounds below the true lengths: each length is cut to its bound; no error, nothing out of bounds,
  // and the queries past the cut (not in any sequence the kernels see) are left as they were.
  device_problem<T> cut(t);
  const device_offsets_copy offsets(t.cu_q, t.cu_k, 100, 150);
  auto c = cut.args();
  c.device_seqlens = offsets.get();
  attn.forward(c);
  cut.fetch();
  MOBA_CUDA_CHECK(cudaGetLastError());
  const std::int64_t row = (t.cu_q[1] - 1) * t.s.hq * t.s.d;  // the first sequence's last query
  CHECK(is_poison(cut.out[row]));
}

TEST_CASE("moba::cuda: one object, two threads on two streams with their own workspaces, gives the serial bits") {
  using T = moba::bfloat16;
  const moba::config cfg = sparse(64, 3);
  moba::attention<moba::cuda, T> attn(cfg);
  std::vector<moba::test::tensors<T>> inputs;
  for (int n = 0; n < 2; ++n)
    inputs.push_back(moba::test::random_tensors<T>({{600, 250}, {600, 500}, 4, 2, 64}, moba::test::fresh_seed()));
  for (const bool device : {true, false}) {
    CAPTURE(device);
    std::vector<std::vector<T>> serial;
    for (const auto& t : inputs) {
      device_problem<T> p(t);
      attn.forward(p.host_offset_args());
      p.fetch();
      serial.push_back(p.out);
    }
    std::vector<int> mismatches(2, 0);
    auto work = [&](int n) {
      cudaStream_t stream = nullptr;
      MOBA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      device_problem<T> p(inputs[n]);
      const device_offsets_copy offsets(inputs[n].cu_q, inputs[n].cu_k, 600, 600);
      auto a = device ? p.args() : p.host_offset_args();
      if (device) a.device_seqlens = offsets.get();
      device_buffer ws(attn.workspace_size(a));
      for (int call = 0; call < 20; ++call) {
        attn.forward(a, {stream, ws.data, ws.bytes});
        MOBA_CUDA_CHECK(cudaStreamSynchronize(stream));
        p.dout.copy_back();
        mismatches[n] += std::memcmp(p.out.data(), serial[n].data(), p.out.size() * sizeof(T)) != 0;
      }
      MOBA_CUDA_CHECK(cudaStreamDestroy(stream));
    };
    std::thread a(work, 0), b(work, 1);
    a.join();
    b.join();
    CHECK(mismatches[0] == 0);
    CHECK(mismatches[1] == 0);
  }
}

TEST_CASE("moba::cuda: a call with device offsets captured in a CUDA graph replays 50 times with the bits of a direct call") {
  using T = moba::bfloat16;
  const moba::config cfg = sparse(64, 3);
  moba::attention<moba::cuda, T> attn(cfg);
  const auto t = moba::test::random_tensors<T>({{500, 300}, {500, 700}, 4, 2, 128}, moba::test::fresh_seed());
  device_problem<T> captured(t), direct(t);
  const device_offsets_copy offsets(t.cu_q, t.cu_k, 500, 700);
  auto a = captured.args();
  a.device_seqlens = offsets.get();
  auto b = direct.args();
  b.device_seqlens = offsets.get();
  device_buffer ws(attn.workspace_size(a));
  // The size follows from shapes and bounds alone, before any tensor exists.
  moba::backends::cuda::workspace_shape shape{t.total_q(), t.total_k(), 2, 500, 700, 4, 2, 128, cfg.block_size, cfg.top_k};
  CHECK(moba::backend_impl<moba::cuda, T>::workspace_size(shape) == ws.bytes);
  // A workspace that is too small or not 256-byte aligned is refused before anything is enqueued.
  CHECK_THROWS_WITH_AS(attn.forward(a, {nullptr, ws.data, ws.bytes - 1}), doctest::Contains("is too small"),
                       moba::invalid_argument);
  CHECK_THROWS_WITH_AS(attn.forward(a, {nullptr, static_cast<char*>(ws.data) + 128, ws.bytes - 128}),
                       doctest::Contains("not 256-byte aligned"), moba::invalid_argument);
  cudaStream_t stream = nullptr;
  MOBA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  MOBA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  attn.forward(a, {stream, ws.data, ws.bytes});
  MOBA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  MOBA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  std::mt19937_64 rng(moba::test::fresh_seed());
  int mismatches = 0;
  for (int replay = 0; replay < 50; ++replay) {
    // New inputs in the same buffers, for both paths.
    for (auto [host, dev] : {std::pair{&captured.t.q, captured.q.device}, {&captured.t.k, captured.k.device},
                             {&captured.t.v, captured.v.device}}) {
      *host = moba::test::random_values<T>(host->size(), rng);
      MOBA_CUDA_CHECK(cudaMemcpy(dev, host->data(), host->size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    MOBA_CUDA_CHECK(cudaMemcpy(direct.q.device, captured.t.q.data(), t.q.size() * sizeof(T), cudaMemcpyHostToDevice));
    MOBA_CUDA_CHECK(cudaMemcpy(direct.k.device, captured.t.k.data(), t.k.size() * sizeof(T), cudaMemcpyHostToDevice));
    MOBA_CUDA_CHECK(cudaMemcpy(direct.v.device, captured.t.v.data(), t.v.size() * sizeof(T), cudaMemcpyHostToDevice));
    captured.poison();
    direct.poison();
    MOBA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(stream));
    attn.forward(b);
    captured.fetch();
    direct.fetch();
    mismatches += std::memcmp(captured.out.data(), direct.out.data(), direct.out.size() * sizeof(T)) != 0 ||
                  std::memcmp(captured.lse.data(), direct.lse.data(), direct.lse.size() * sizeof(float)) != 0;
    mismatches += is_poison(captured.out[0]);
  }
  CHECK(mismatches == 0);
  MOBA_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MOBA_CUDA_CHECK(cudaGraphDestroy(graph));
  MOBA_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_CASE_TEMPLATE("moba::cuda: forward with its own selection passed in gives the gate's bits; gate-only writes that selection",
                   T, moba::bfloat16, float) {
  const auto t = moba::test::random_tensors<T>({{600, 200}, {600, 900}, 4, 2, 64}, moba::test::fresh_seed());
  for (const auto& cfg : {sparse(64, 3), sparse(32, 10)}) {
    CAPTURE(cfg.top_k);
    const auto want = moba::test::run<moba::cuda, T>(t, cfg);
    moba::attention<moba::cuda, T> attn(cfg);
    device_problem<T> got(t);
    device_copy<const std::int32_t, 4> selection(
        moba::selection(want.selected.data(), 1, t.total_q(), t.s.hq, want.width));
    auto a = got.host_offset_args();
    a.selection = selection.view();
    attn.forward(a);
    got.fetch();
    CHECK(std::memcmp(got.out.data(), want.out.data(), want.out.size() * sizeof(T)) == 0);
    CHECK(std::memcmp(got.lse.data(), want.lse.data(), want.lse.size() * sizeof(got.lse[0])) == 0);

    std::vector<std::int32_t> gated(want.selected.size(), poison_value<std::int32_t>());
    device_copy<std::int32_t, 4> dgated(moba::selection(gated.data(), 1, t.total_q(), t.s.hq, want.width));
    auto g = got.host_offset_args();
    g.out = {};
    g.lse = {};
    g.selected = dgated.view();
    got.poison();
    attn.gate(g);
    MOBA_CUDA_CHECK(cudaDeviceSynchronize());
    dgated.copy_back();
    got.dout.copy_back();
    CHECK(gated == want.selected);
    CHECK(std::all_of(got.out.begin(), got.out.end(), [](T x) { return is_poison(x); }));
  }
}

TEST_CASE("moba::cuda: a hand-made selection matches the float64 reference given it; invalid entries are skipped safely") {
  using T = moba::bfloat16;
  const std::uint64_t seed = moba::test::fresh_seed();
  CAPTURE(seed);
  const auto t = moba::test::random_tensors<T>({{500, 300}, {500, 800}, 4, 2, 128}, seed);
  const moba::config cfg = sparse(32, 3);  // top_k does not bound a given selection's width
  const std::int64_t width = 9;
  std::mt19937_64 rng(seed);
  // Per query and head: a random subset of its history blocks (0 to width − 1 of them), ascending,
  // then its current block, then -1.
  std::vector<std::int32_t> valid(t.total_q() * t.s.hq * width, -1);
  for (std::size_t s = 0; s + 1 < t.cu_q.size(); ++s) {
    const std::int64_t q_len = t.cu_q[s + 1] - t.cu_q[s], k_len = t.cu_k[s + 1] - t.cu_k[s];
    for (std::int64_t i = 0; i < q_len; ++i) {
      const std::int64_t c = (k_len - q_len + i) / cfg.block_size;
      for (std::int64_t h = 0; h < t.s.hq; ++h) {
        std::vector<std::int32_t> blocks(c);
        for (std::int32_t j = 0; j < c; ++j) blocks[j] = j;
        std::shuffle(blocks.begin(), blocks.end(), rng);
        blocks.resize(std::min<std::int64_t>(c, rng() % width));
        std::sort(blocks.begin(), blocks.end());
        blocks.push_back(static_cast<std::int32_t>(c));
        std::copy(blocks.begin(), blocks.end(), valid.begin() + ((t.cu_q[s] + i) * t.s.hq + h) * width);
      }
    }
  }
  auto run_with = [&](auto backend, const std::vector<std::int32_t>& sel) {
    using B = decltype(backend);
    moba::test::outputs<T> o;
    o.out.assign(t.q.size(), poison_value<T>());
    o.lse.assign(t.total_q() * t.s.hq, poison_value<float>());
    moba::attention<B, T> attn(cfg);
    auto a = moba::forward_args<T>{.q = t.q_view(), .k = t.k_view(), .v = t.v_view(),
                                   .out = moba::packed(o.out.data(), t.total_q(), t.s.hq, t.s.d),
                                   .lse = moba::bsh(o.lse.data(), 1, t.total_q(), t.s.hq),
                                   .cu_seqlens_q = t.cu_q, .cu_seqlens_k = t.cu_k,
                                   .selection = moba::selection(sel.data(), 1, t.total_q(), t.s.hq, width)};
    if constexpr (std::is_same_v<B, moba::cuda>) {
      device_copy q(a.q), k(a.k), v(a.v);
      device_copy sl(a.selection);
      device_copy out(a.out);
      device_copy lse(a.lse);
      auto d = a;
      d.q = q.view(), d.k = k.view(), d.v = v.view(), d.selection = sl.view(), d.out = out.view(), d.lse = lse.view();
      attn.forward(d);
      MOBA_CUDA_CHECK(cudaDeviceSynchronize());
      out.copy_back();
      lse.copy_back();
    } else {
      attn.forward(a);
    }
    return o;
  };
  const auto want = run_with(moba::reference{}, valid);
  const auto got = run_with(moba::cuda{}, valid);
  CHECK(moba::test::rel_error(got.out, want.out) <= moba::test::output_bound<T>());
  CHECK(moba::test::rel_error(got.lse, want.lse) <= moba::test::output_bound<T>());
  // Garbage between the valid entries (negative, future, repeated, descending blocks) is skipped:
  // the same bits as the valid selection. Each row keeps its valid entries in order.
  std::vector<std::int32_t> hostile(valid.size());
  for (std::size_t row = 0; row < valid.size() / width; ++row) {
    const auto* v = &valid[row * width];
    auto* h = &hostile[row * width];
    std::int64_t n = 0;
    for (std::int64_t w = 0; w < width && v[w] >= 0 && n < width; ++w) {
      if (n + 1 < width && rng() % 2) h[n++] = static_cast<std::int32_t>(rng() % 3 == 0 ? -5 : rng() % 2 ? 1 << 20 : 0);
      h[n++] = v[w];
    }
    for (; n < width; ++n) h[n] = static_cast<std::int32_t>(rng() % 2 ? 1 << 30 : -1);
  }
  // The hostile rows may have lost valid entries to the width: compare with the CUDA result of the
  // selection the kernel is documented to keep (ascending entries in [0, c), then c).
  std::vector<std::int32_t> kept(valid.size(), -1);
  for (std::size_t s = 0; s + 1 < t.cu_q.size(); ++s) {
    const std::int64_t q_len = t.cu_q[s + 1] - t.cu_q[s], k_len = t.cu_k[s + 1] - t.cu_k[s];
    for (std::int64_t i = 0; i < q_len; ++i) {
      const std::int64_t c = (k_len - q_len + i) / cfg.block_size;
      for (std::int64_t hd = 0; hd < t.s.hq; ++hd) {
        const std::int64_t row = (t.cu_q[s] + i) * t.s.hq + hd;
        std::int64_t n = 0, last = -1;
        for (std::int64_t w = 0; w < width && n < std::min<std::int64_t>(c, width - 1); ++w) {
          const std::int32_t j = hostile[row * width + w];
          if (j <= last || j >= c) continue;
          kept[row * width + n++] = j;
          last = j;
        }
        kept[row * width + n] = static_cast<std::int32_t>(c);
      }
    }
  }
  const auto from_hostile = run_with(moba::cuda{}, hostile);
  const auto from_kept = run_with(moba::cuda{}, kept);
  CHECK(std::memcmp(from_hostile.out.data(), from_kept.out.data(), from_kept.out.size() * sizeof(T)) == 0);
}
