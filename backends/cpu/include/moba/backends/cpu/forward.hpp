// SPDX-License-Identifier: MIT
/// @file moba::cpu: the forward pass on oneTBB threads; each work item is a query tile of one kv-head
/// group (kernel.hpp). Key-block means are computed once per (sequence, kv head) first.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <moba/attention.hpp>
#include <moba/backends/cpu/backward.hpp>
#include <moba/backends/cpu/kernel.hpp>
#include <moba/backends/cpu/simd.hpp>
#include <moba/backends/cpu/threads.hpp>
#include <moba/backends/cpu/tiling.hpp>
#include <moba/backends/cpu/workspace.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/flops.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cpu {

/// Options of the CPU backend: `threads` = 0 uses oneTBB's default (every core).
struct options {
  int threads = 0;
};

/// Serialises the calls on one backend object. Copies and moves get a mutex of their own (the state
/// beside it is copied; copying an object in use is a race like any other).
struct call_mutex {
  std::mutex mutex;
  call_mutex() = default;
  call_mutex(const call_mutex&) {}
  call_mutex& operator=(const call_mutex&) { return *this; }
};

/// State reused across calls: the work list, the block means and the per-thread tile scratch.
template <class A>
struct forward_state {
  std::vector<work_item> items;
  std::vector<std::int64_t> means_offset;  // per (sequence, kv head), into means
  aligned_vector<A> means;
  per_thread<tile_workspace<A>> scratch;
};

template <class T, class A>
void forward(const core::fwd_params<T>& p, forward_state<A>& state) {
  const std::int64_t dp = padded_dim<A>(p.head_dim), block = p.block_size;
  const std::int64_t tile = query_tile_tokens(block, p.q_heads / p.kv_heads);
  // Block means (SPEC §Blocks 2) for every (sequence, kv head), accumulated in A, divided by the count;
  // a selection given by the caller needs none.
  state.means_offset.assign(p.seqs.count * p.kv_heads + 1, 0);
  for (std::int64_t s = 0; s < p.seqs.count; ++s)
    for (std::int64_t kv = 0; kv < p.kv_heads; ++kv)
      state.means_offset[s * p.kv_heads + kv + 1] =
          state.means_offset[s * p.kv_heads + kv] + core::block_count(p.seqs[s].k_len, block) * dp;
  grow(state.means, state.means_offset.back());
  if (!p.selection.given()) parallel_for_each(p.seqs.count * p.kv_heads, [&](std::int64_t item) {
    const std::int64_t s = item / p.kv_heads, kv = item % p.kv_heads;
    const sequence_info seq = p.seqs[s];
    if (seq.q_len == 0) return;
    A* means = state.means.data() + state.means_offset[item];
    aligned_vector<A> key(dp);
    for (std::int64_t j = 0; j < core::block_count(seq.k_len, block); ++j) {
      A* mean = means + j * dp;
      std::fill_n(mean, dp, A(0));
      const std::int64_t b = core::block_begin(j, block), e = core::block_end(j, block, seq.k_len);
      for (std::int64_t t = b; t < e; ++t) {
        widen_row<A>(&p.k(seq.batch, seq.k_start + t, kv, 0), key.data(), p.head_dim, dp);
        for (std::int64_t x = 0; x < dp; ++x) mean[x] += key[x];
      }
      for (std::int64_t x = 0; x < dp; ++x) mean[x] /= static_cast<A>(e - b);
    }
  });

  // Work items aligned to tiles of absolute position, costliest first so that long ones start early.
  state.items.clear();
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    for (std::int64_t i0 = 0; i0 < seq.q_len;) {
      const std::int64_t i1 = std::min(seq.q_len, (seq.pos(i0) / tile + 1) * tile - (seq.k_len - seq.q_len));
      double cost = 0;
      for (std::int64_t i = i0; i < i1; i += std::max<std::int64_t>(1, (i1 - i0) / 8))
        cost += static_cast<double>(core::attended_keys(seq.pos(i), block, p.top_k, p.full));
      for (std::int64_t kv = 0; kv < p.kv_heads; ++kv) state.items.push_back({s, kv, i0, i1, cost * (i1 - i0)});
      i0 = i1;
    }
  }
  std::sort(state.items.begin(), state.items.end(), [](const work_item& a, const work_item& b) { return a.cost > b.cost; });
  parallel_for_each(static_cast<std::int64_t>(state.items.size()), [&](std::int64_t x) {
    const work_item& item = state.items[x];
    run_tile<T, A>(p, p.seqs[item.seq], item.kv, item.i0, item.i1,
                   state.means.data() + state.means_offset[item.seq * p.kv_heads + item.kv], state.scratch.local());
  });
}

}  // namespace moba::backends::cpu

namespace moba {

/// The CPU backend. Its work list, block means and per-thread scratch are state kept across calls (no
/// allocation once grown), so calls on one object are serialised; use one object per thread to run in
/// parallel (SPEC §Threads). Each call runs on the object's `threads` workers.
template <class Dtype>
struct backend_impl<cpu, Dtype> {
  static constexpr const char* name = "moba::cpu";
  backends::cpu::options opts;
  backends::cpu::forward_state<accum_t<Dtype>> state;
  backends::cpu::backward_state<accum_t<Dtype>> backward_state;
  std::vector<std::int32_t> recomputed;  // the gate's selection when backward is given none
  backends::cpu::thread_pool pool;
  backends::cpu::call_mutex calls;

  explicit backend_impl(const config&, backends::cpu::options o = {}) : opts(o), pool(o.threads) {}
  static bool supports_head_dim(std::int64_t) { return true; }
  static std::string head_dims() { return "any"; }
  /// A caller's selection is checked entry by entry (SPEC §Blocks 7) before anything is written.
  void check(const core::fwd_params<Dtype>& p) const {
    if (p.selection.given()) detail::check_selection(p);
  }
  void forward(const core::fwd_params<Dtype>& p) {
    const std::lock_guard<std::mutex> lock(calls.mutex);
    pool.run([&] { backends::cpu::forward(p, state); });
  }
  void check(const core::bwd_params<Dtype>& p) const {
    if (p.selection.given()) detail::check_selection(p);
  }
  /// The selection held fixed is the caller's or the forward's gate run again (the same kernel, so
  /// the same blocks); full mode needs none stored.
  void backward(const core::bwd_params<Dtype>& p) {
    const std::lock_guard<std::mutex> lock(calls.mutex);
    pool.run([&] {
      tensor_view<const std::int32_t, 4> selection = p.selection;
      if (!selection.given() && !p.full && p.seqs.max_k_len > 0) {
        core::fwd_params<Dtype> gate;
        static_cast<core::problem<Dtype>&>(gate) = p;
        gate.gate_only = true;
        const std::int64_t width = core::selection_width(
            core::current_block(p.seqs.max_k_len - 1, p.block_size), p.top_k, false);
        recomputed.resize(p.q.extent[0] * p.q.extent[1] * p.q_heads * width);
        gate.selected = moba::selection(recomputed.data(), p.q.extent[0], p.q.extent[1], p.q_heads, width);
        backends::cpu::forward(gate, state);
        selection = gate.selected;
      }
      backends::cpu::backward(p, selection, backward_state);
    });
  }
};

}  // namespace moba
