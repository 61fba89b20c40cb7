// SPDX-License-Identifier: MIT
/// @file moba::cuda: backend_impl<cuda, Dtype> (bf16/f16 on tensor cores, float on CUDA cores): the
/// workspace, the sequence table (uploaded, or built on the device) and the launches. The only
/// CUDA-runtime caller.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include <moba/attention.hpp>
#include <moba/backends/cuda/attention.cuh>
#include <moba/backends/cuda/backward.cuh>
#include <moba/backends/cuda/check.hpp>
#include <moba/backends/cuda/gate.cuh>
#include <moba/backends/cuda/given_selection.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/simt.cuh>
#include <moba/backends/cuda/slots.cuh>
#include <moba/backends/cuda/table.cuh>
#include <moba/backends/cuda/tile_size.hpp>
#include <moba/core/dispatch.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// Where each part of the device workspace lies (byte offsets, 256-aligned) for one call.
struct workspace_layout {
  std::int64_t table = 0, tickets = 0, counts = 0, ready = 0, kbar = 0, sel = 0, lse2 = 0, start = 0, tile_count = 0, tile_list = 0,
               rows = 0, total = 0;
  std::int64_t zeroed = 0;                     // bytes from `tickets` that each call zeroes
  std::int64_t total_blocks = 0, passes = 0;  // history passes: the most history blocks any query has
  std::int64_t history_tiles = 0;             // bound on one pass's tiles: at most one partly filled per list
  std::int64_t counters = 0;                  // slot counts per slot: kv heads × total_blocks × count_shards
};

inline std::int64_t align256(std::int64_t n) { return (n + 255) / 256 * 256; }

/// Upper bounds of a call's totals, which size its launches and workspace: exact when the host built
/// the table, from the shapes and max_seqlen bounds with device offsets.
struct call_bounds {
  std::int64_t sequences = 0, rows = 0, tiles = 0, blocks = 0, most_history = 0;
};

/// What a call's workspace depends on: shapes and bounds, no tensors. `top_k` and `full` are the
/// call's own, or a given selection's width and false (SPEC §Blocks 7).
struct workspace_shape {
  std::int64_t total_q = 0, total_k = 0, batch = 0, max_seqlen_q = 0, max_seqlen_k = 0;
  std::int64_t q_heads = 0, kv_heads = 0, head_dim = 0, block_size = 0, top_k = 0;
  bool full = false, gate_only = false, tensor_cores = true;
};

/// Bounds from shapes alone: the sequences' tiles and blocks add at most one partial each.
inline call_bounds bounds_of(const workspace_shape& s) {
  call_bounds b;
  b.sequences = s.batch;
  if (s.batch == 0) return b;
  const std::int64_t max_q = std::min(s.max_seqlen_q, s.total_q), max_k = std::min(s.max_seqlen_k, s.total_k);
  auto at_most = [&](std::int64_t per_sequence, std::int64_t by_total) {
    std::int64_t all = 0;
    return __builtin_mul_overflow(per_sequence, s.batch, &all) ? by_total : std::min(all, by_total);
  };
  b.rows = at_most(max_q, s.total_q);
  b.tiles = at_most((max_q + tile_rows - 1) / tile_rows, s.total_q / tile_rows + s.batch);
  b.blocks = at_most(core::block_count(max_k, s.block_size), s.total_k / s.block_size + s.batch);
  b.most_history = max_k > 0 ? core::history_count(core::current_block(max_k - 1, s.block_size), s.top_k, false) : 0;
  return b;
}

/// The layout of the workspace of a call of this shape within these bounds.
inline workspace_layout plan(const workspace_shape& s, const call_bounds& b) {
  workspace_layout w;
  w.total_blocks = b.blocks;
  std::int64_t at = align256((b.sequences + 1) * static_cast<std::int64_t>(sizeof(sequence_desc)));
  auto take = [&](std::int64_t& where, std::int64_t bytes) {
    where = at;
    at += align256(bytes);
  };
  const std::int64_t row_heads = b.rows * s.q_heads, keys = s.kv_heads * w.total_blocks;
  w.passes = s.tensor_cores && !s.full && !s.gate_only ? b.most_history : 0;
  if (w.passes > 0) {  // the row lists hold int32 keys, entries and offsets
    detail::require(keys < (std::int64_t{1} << 31), "moba::cuda: ", keys, " key blocks (times kv heads) is too many");
    detail::require(row_heads < (std::int64_t{1} << 31), "moba::cuda: ", row_heads, " query rows (times heads) is too many");
  }
  // One work ticket per attention launch (history passes, then the current blocks), right after them
  // the slot counts and the block means' flags: one memset zeroes all three.
  take(w.tickets, s.tensor_cores ? (w.passes + 1) * 4 : 0);
  w.counters = keys * count_shards;
  take(w.counts, w.passes * w.counters * 4);
  take(w.ready, s.full ? 0 : keys * 4);
  w.zeroed = at - w.tickets;
  if (!s.full) {
    take(w.kbar, w.total_blocks * s.kv_heads * kbar_pieces * s.head_dim * 2);
    take(w.sel, row_heads * s.top_k * 4);
    if (w.passes > 0) {
      w.history_tiles = (row_heads + tile_rows - 1) / tile_rows + std::min(keys, row_heads);
      take(w.lse2, row_heads * 4);
      take(w.start, w.passes * w.counters * 4);
      take(w.tile_count, w.passes * 8);
      take(w.tile_list, w.passes * w.history_tiles * static_cast<std::int64_t>(sizeof(list_tile)));
      take(w.rows, row_heads * 4);
    }
  }
  w.total = at;
  return w;
}

/// The shape of a validated call, with a given selection's width in place of top_k.
template <class T>
workspace_shape shape_of(const core::fwd_params<T>& p) {
  const bool given = p.selection.given();
  return {p.q.extent[1], p.k.extent[1], p.seqs.count, p.seqs.max_q_len, p.seqs.max_k_len, p.q_heads, p.kv_heads,
          p.head_dim, p.block_size, given ? p.selection.extent[3] : p.top_k, p.full && !given, p.gate_only,
          !std::is_same_v<T, float>};
}

/// The host-built table of a call with host offsets (validated), and its exact totals as bounds.
template <class T>
call_bounds host_table(const core::fwd_params<T>& p, std::int64_t top_k, std::vector<sequence_desc>& tab) {
  tab.assign(p.seqs.count + 1, {});
  call_bounds b;
  b.sequences = p.seqs.count;
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    const table_counts n = counts_of(seq, p.block_size);
    tab[s].seq = seq;
    tab[s + 1].block_offset = tab[s].block_offset + n.blocks;
    tab[s + 1].tile_offset = tab[s].tile_offset + n.tiles;
    tab[s + 1].row_offset = tab[s].row_offset + n.rows;
    if (seq.q_len > 0)
      b.most_history = std::max(b.most_history, core::history_count(core::current_block(seq.pos(seq.q_len - 1), p.block_size),
                                                                    top_k, false));
  }
  b.rows = tab[p.seqs.count].row_offset;
  b.tiles = tab[p.seqs.count].tile_offset;
  b.blocks = tab[p.seqs.count].block_offset;
  return b;
}

inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

}  // namespace moba::backends::cuda

namespace moba {

/// The CUDA backend. Construct through `moba::attention<moba::cuda, Dtype> attn(cfg, stream)`.
/// Tensors are device pointers. Work is enqueued on a stream without synchronising the device.
///
/// Offsets: `cu_seqlens_q/k` on the host (validated there; the per-sequence table is built on the
/// host and uploaded through a pinned staging buffer, and a call waits for the previous call's copy
/// from it), or `device_seqlens` in device memory with max_seqlen bounds (flash-attention's
/// convention): then a call does no host work on them — no synchronisation, no staging, no read of
/// device memory, and no allocation when it brings its workspace; a prologue kernel builds the table.
/// What such a call cannot check on the host, the kernels make safe: each offset is clamped into
/// [0, tokens] and to a running maximum (sequences never overlap), each length to its max_seqlen
/// bound and q_len to k_len. Bad offsets so give unspecified results for the sequences they describe,
/// never an access out of bounds. Likewise a `selection` is read as given: entries outside [0, the
/// query's current block) and entries that do not ascend are skipped, and the current block is
/// always attended.
///
/// Streams and workspaces: `forward(args)` runs on the object's stream in its workspace (the one set
/// by set_workspace, or an owned one grown with stream-ordered cudaMallocAsync, so the stream must
/// outlive the object). `forward(args, {.stream, .workspace, .workspace_bytes})` runs on that stream
/// in that workspace (workspace_size(...) bytes, 256-byte aligned; null: the object's).
/// What may run at once: calls with device offsets that each bring their own workspace share no
/// state and may be issued from any threads onto any streams; such a call may be captured in a CUDA
/// graph and replayed. Host-offset calls serialise on the staging buffer (a mutex) and may not be
/// captured. Calls in the object's own workspace must not overlap on the device: issue them on one
/// stream (or order them). Errors throw moba::device_error.
template <class Dtype>
struct backend_impl<cuda, Dtype> {
  static constexpr const char* name = "moba::cuda";
  using head_dim_list = core::head_dim_list<64, 128>;
  static constexpr bool tensor_cores = !std::is_same_v<Dtype, float>;
  static constexpr bool device_offsets = true;

  /// Per-call stream and workspace (see the class comment).
  struct call_options {
    cudaStream_t stream = nullptr;
    void* workspace = nullptr;
    std::int64_t workspace_bytes = 0;
  };

  explicit backend_impl(const config&, cudaStream_t stream = nullptr) : stream_(stream) {
    int device = 0;
    MOBA_CUDA_CHECK(cudaGetDevice(&device));
    MOBA_CUDA_CHECK(cudaDeviceGetAttribute(&major_, cudaDevAttrComputeCapabilityMajor, device));
    MOBA_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device));
    MOBA_CUDA_CHECK(cudaEventCreateWithFlags(&staged_, cudaEventDisableTiming));
  }
  backend_impl(const backend_impl&) = delete;
  backend_impl& operator=(const backend_impl&) = delete;
  ~backend_impl() {
    if (owned_ != nullptr) cudaFreeAsync(owned_, stream_);
    if (staging_ != nullptr) {
      cudaEventSynchronize(staged_);
      cudaFreeHost(staging_);
    }
    cudaEventDestroy(staged_);
  }

  static bool supports_head_dim(std::int64_t d) { return head_dim_list::contains(d); }
  static std::string head_dims() { return head_dim_list::describe(); }

  cudaStream_t stream() const { return stream_; }
  /// Later calls without call_options run on `s`. They reuse the workspace of the calls before, so
  /// what still runs on the old stream must be ordered before them (an event, or a synchronisation).
  void set_stream(cudaStream_t s) { stream_ = s; }

  /// Device workspace bytes a forward call with these parameters needs (sequence table, block means,
  /// selections, and the sparse kernel's per-CTA scratch).
  std::int64_t workspace_size(const core::fwd_params<Dtype>& p) const {
    const backends::cuda::workspace_shape s = backends::cuda::shape_of(p);
    if (p.seqs.on_device) return backends::cuda::plan(s, backends::cuda::bounds_of(s)).total;
    std::vector<backends::cuda::sequence_desc> table;
    return backends::cuda::plan(s, backends::cuda::host_table(p, s.top_k, table)).total;
  }
  /// The same from shapes and bounds alone (device offsets: enough for any call within them).
  static std::int64_t workspace_size(const backends::cuda::workspace_shape& s) {
    return backends::cuda::plan(s, backends::cuda::bounds_of(s)).total;
  }
  /// Use caller-owned device memory (256-byte aligned) as the workspace; nullptr returns to the owned one.
  /// A call whose workspace_size exceeds `bytes` throws moba::invalid_argument before enqueuing anything.
  void set_workspace(void* data, std::int64_t bytes) {
    user_ = static_cast<unsigned char*>(data);
    user_bytes_ = bytes;
  }
  /// Peak device bytes the owned workspace reached (for the benchmark's extra_bytes counter).
  std::int64_t workspace_capacity() const { return owned_bytes_; }
  /// Run the attention kernels on at most `ctas` CTAs at once (0, the default: one per SM). Fewer
  /// leave SMs to concurrent work; each CTA then runs more work items in turn.
  void set_max_ctas(int ctas) {
    detail::require(ctas >= 0, name, " max_ctas must be >= 0; got ", ctas);
    max_ctas_ = ctas;
  }
  /// Optional events recorded on the stream before the gate (block means) and after it (top-k), so
  /// that a caller can time the gating share of a call. Null (the default) records nothing.
  void set_gate_events(cudaEvent_t before, cudaEvent_t after) {
    gate_before_ = before;
    gate_after_ = after;
  }

  void check(const core::fwd_params<Dtype>& p) const { check(p, {stream_, user_, user_bytes_}); }
  void check(const core::fwd_params<Dtype>& p, const call_options& call) const { check_call(p, call, workspace_size(p)); }

  /// Device workspace bytes a backward call needs: the forward's gate's (table, block means,
  /// selections) and δ, 4 bytes per query and head.
  std::int64_t workspace_size(const core::bwd_params<Dtype>& p) const {
    const core::fwd_params<Dtype> f = gate_params(p);
    const backends::cuda::workspace_shape s = backends::cuda::shape_of(f);
    std::vector<backends::cuda::sequence_desc> table;
    const backends::cuda::call_bounds b = p.seqs.on_device ? backends::cuda::bounds_of(s) : backends::cuda::host_table(f, s.top_k, table);
    return backends::cuda::plan(s, b).total + backends::cuda::align256(b.rows * p.q_heads * 4);
  }
  void check(const core::bwd_params<Dtype>& p) const { check(p, {stream_, user_, user_bytes_}); }
  void check(const core::bwd_params<Dtype>& p, const call_options& call) const {
    check_call(gate_params(p), call, workspace_size(p));
  }

  /// dq, dk, dv (SPEC §Backward) with the selection held fixed: the caller's, or the gate run again
  /// (the forward's kernels, so the same blocks). CUDA cores, deterministic (backward.cuh).
  void backward(const core::bwd_params<Dtype>& p) { backward(p, {stream_, nullptr, 0}); }
  void backward(const core::bwd_params<Dtype>& p, const call_options& call) {
    namespace c = backends::cuda;
    const core::fwd_params<Dtype> f = gate_params(p);
    const cudaStream_t stream = call.stream;
    const call_setup s = setup(f, call, true);
    auto* delta = reinterpret_cast<float*>(s.ws + s.w.total);
    std::int32_t* sel = f.full ? nullptr : reinterpret_cast<std::int32_t*>(s.ws + s.w.sel);
    if (s.w.zeroed > 0) MOBA_CUDA_CHECK(cudaMemsetAsync(s.ws + s.w.tickets, 0, s.w.zeroed, stream));
    const std::int64_t row_heads = s.b.rows * p.q_heads;
    const float scale = static_cast<float>(p.softmax_scale);
    core::with_head_dim(
        head_dim_list{}, p.head_dim,
        [&](auto dim) {
          constexpr int D = decltype(dim)::value;
          if (row_heads > 0) {
            if (f.selection.given()) {
              c::given_selection_kernel<Dtype><<<grid((row_heads + 255) / 256), 256, 0, stream>>>(f, s.table, sel, c::slot_tally{}, nullptr);
              c::check_launch("given_selection_kernel");
            } else if (!f.full) {
              gate(f, s.b, s.w, s.table, s.ws, c::slot_tally{}, stream);
            }
            const unsigned warps_grid = grid((row_heads * 32 + c::backward_threads - 1) / c::backward_threads);
            c::delta_kernel<Dtype><<<warps_grid, c::backward_threads, 0, stream>>>(p, s.table, delta);
            c::check_launch("delta_kernel");
            c::dq_kernel<Dtype, D><<<warps_grid, c::backward_threads, 0, stream>>>(p, s.table, sel, f.top_k, delta, scale);
            c::check_launch("dq_kernel");
          }
          // Every key's dk and dv are written, zero where no query attends it.
          const std::int64_t tiles = (p.block_size + c::dkdv_keys - 1) / c::dkdv_keys;
          c::dkdv_kernel<Dtype, D><<<grid(p.kv_heads * s.w.total_blocks * tiles), c::backward_threads, 0, stream>>>(
              p, s.table, sel, f.top_k, delta, scale, s.w.total_blocks);
          c::check_launch("dkdv_kernel");
        },
        [] {});
  }

 private:
  /// Checks that do not depend on the pass: the device, top_k, alignment and the workspace's size.
  void check_call(const core::fwd_params<Dtype>& p, const call_options& call, std::int64_t need) const {
    detail::require(major_ >= 8, name, " needs compute capability >= 8.0 (bf16 tensor cores, also for the gate); this device has ",
                    major_, ".x");
    detail::require(p.full || p.selection.given() || p.top_k <= backends::cuda::max_top_k, name, " supports top_k <= ",
                    backends::cuda::max_top_k, " in sparse mode; got ", p.top_k);
    if constexpr (tensor_cores) {
      // 16-byte vector loads of q, k, v rows and loads and stores of out rows.
      auto aligned = [](const auto& v, const char* what) {
        const bool ok = reinterpret_cast<std::uintptr_t>(v.data) % 16 == 0 && v.stride[0] % 8 == 0 &&
                        v.stride[1] % 8 == 0 && v.stride[2] % 8 == 0;
        detail::require(ok, name, " needs ", what, " 16-byte aligned with strides that are multiples of 8 elements; got ",
                        static_cast<const void*>(v.data), " and strides ", v.stride[0], ", ", v.stride[1], ", ", v.stride[2]);
      };
      aligned(p.q, "q");
      aligned(p.k, "k");
      aligned(p.v, "v");
      if (!p.gate_only) aligned(p.out, "out");
    }
    const bool own = call.workspace == nullptr && user_ == nullptr;
    if (!own) {
      const auto* ws = call.workspace != nullptr ? call.workspace : user_;
      const std::int64_t bytes = call.workspace != nullptr ? call.workspace_bytes : user_bytes_;
      detail::require(reinterpret_cast<std::uintptr_t>(ws) % 256 == 0, name, " workspace at ", ws,
                      " is not 256-byte aligned");
      detail::require(need <= bytes, name, " workspace of ", bytes, " bytes is too small: this call needs ", need);
    }
  }


 public:
  void forward(const core::fwd_params<Dtype>& p) { forward(p, {stream_, nullptr, 0}); }

  void forward(const core::fwd_params<Dtype>& given, const call_options& call) {
    namespace c = backends::cuda;
    core::fwd_params<Dtype> p = given;
    if (p.selection.given()) {  // SPEC §Blocks 7: the selection's width in place of top_k
      p.full = false;
      p.top_k = p.selection.extent[3];
    }
    const cudaStream_t stream = call.stream;
    const call_setup s = setup(p, call, false);
    if (s.ws == nullptr) return;  // no queries
    const c::call_bounds& b = s.b;
    const c::workspace_layout& w = s.w;
    unsigned char* ws = s.ws;
    c::sequence_desc* table = s.table;
    auto* tickets = reinterpret_cast<unsigned*>(ws + w.tickets);
    if (w.zeroed > 0) MOBA_CUDA_CHECK(cudaMemsetAsync(tickets, 0, w.zeroed, stream));

    const c::slot_tally tally{w.passes > 0 ? reinterpret_cast<std::int32_t*>(ws + w.counts) : nullptr, w.counters, w.total_blocks};
    std::int32_t* sel = p.full ? nullptr : reinterpret_cast<std::int32_t*>(ws + w.sel);
    if (p.selection.given()) {
      c::given_selection_kernel<Dtype><<<grid((b.rows * p.q_heads + 255) / 256), 256, 0, stream>>>(
          p, table, sel, tally, w.passes > 0 ? reinterpret_cast<float*>(ws + w.lse2) : nullptr);
      c::check_launch("given_selection_kernel");
    } else if (!p.full) {
      gate(p, b, w, table, ws, tally, stream);
    } else if (p.selected.given()) {
      c::full_selection_kernel<Dtype><<<dim3(grid((b.rows + 127) / 128), static_cast<unsigned>(p.q_heads)), 128, 0, stream>>>(p, table);
      c::check_launch("full_selection_kernel");
    }
    if (p.gate_only) return;

    const float scale = static_cast<float>(p.softmax_scale);
    if constexpr (!tensor_cores) {
      c::simt_kernel<Dtype><<<grid((b.rows * p.q_heads + 3) / 4), 128, 0, stream>>>(p, table, sel, scale);
      c::check_launch("simt_kernel");
    } else {
      const float scale_log2 = scale * 1.4426950408889634f;
      core::with_head_dim(
          head_dim_list{}, p.head_dim,
          [&](auto dim) {
            constexpr int D = decltype(dim)::value;
            constexpr int smem = c::attention_smem<Dtype, D>::launch_bytes;
            const c::epilogue last{w.passes > 0 ? reinterpret_cast<float*>(ws + w.lse2) : nullptr, w.passes > 0, true};
            if (w.passes > 0) {
              MOBA_CUDA_CHECK(cudaFuncSetAttribute(c::attention_kernel<Dtype, D, c::history_items>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
              history_passes<D>(p, b, w, table, sel, ws, tickets, scale_log2, stream);
            }
            MOBA_CUDA_CHECK(cudaFuncSetAttribute(c::attention_kernel<Dtype, D, c::causal_items>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            c::attention_kernel<Dtype, D><<<persistent_grid(b.tiles * p.q_heads), c::attention_threads, smem, stream>>>(
                p, table, c::causal_items{}, last, scale_log2, tickets + w.passes);
            c::check_launch("attention_kernel (current blocks)");
          },
          [] {});
    }
  }

 private:
  /// What both passes set up first: the call's bounds, its workspace (the backward's with δ after
  /// the forward's layout) and the sequence table in it, built on the device from device offsets or
  /// uploaded. A forward call without queries sets up nothing (ws null); a backward one still needs
  /// the table to write its keys' zero gradients.
  struct call_setup {
    backends::cuda::call_bounds b;
    backends::cuda::workspace_layout w;
    unsigned char* ws = nullptr;
    backends::cuda::sequence_desc* table = nullptr;
  };
  call_setup setup(const core::fwd_params<Dtype>& p, const call_options& call, bool backward) {
    namespace c = backends::cuda;
    const c::workspace_shape shape = c::shape_of(p);
    std::unique_lock<std::mutex> staging_lock(staging_mutex_, std::defer_lock);
    call_setup s;
    if (p.seqs.on_device) {
      s.b = c::bounds_of(shape);
    } else {
      staging_lock.lock();
      s.b = c::host_table(p, shape.top_k, table_);
    }
    if (s.b.rows == 0 && !backward) return s;
    s.w = c::plan(shape, s.b);
    const std::int64_t bytes = s.w.total + (backward ? c::align256(s.b.rows * p.q_heads * 4) : 0);
    s.ws = call.workspace != nullptr ? static_cast<unsigned char*>(call.workspace) : workspace(bytes, call.stream);
    s.table = reinterpret_cast<c::sequence_desc*>(s.ws + s.w.table);
    if (p.seqs.on_device) {
      c::table_kernel<<<1, c::table_threads, 0, call.stream>>>(p.seqs.cu_seqlens_q, p.seqs.cu_seqlens_k, p.seqs.count,
                                                               p.q.extent[1], p.k.extent[1], p.seqs.max_q_len, p.seqs.max_k_len,
                                                               p.block_size, s.table);
      c::check_launch("table_kernel");
    } else {
      upload_table(s.table, call.stream);
    }
    return s;
  }

  /// The gate's parameters of a backward call: its problem, gate only, with a given selection's
  /// width in place of top_k (SPEC §Blocks 7).
  static core::fwd_params<Dtype> gate_params(const core::bwd_params<Dtype>& p) {
    core::fwd_params<Dtype> f;
    static_cast<core::problem<Dtype>&>(f) = p;
    f.gate_only = true;
    f.selection = p.selection;
    if (f.selection.given()) {
      f.full = false;
      f.top_k = f.selection.extent[3];
    }
    return f;
  }

  /// Copies the host-built table_ to the device through pinned memory; waits only for the previous
  /// call's copy from the staging buffer. The caller holds staging_mutex_.
  void upload_table(backends::cuda::sequence_desc* table, cudaStream_t stream) {
    const std::size_t table_bytes = table_.size() * sizeof(backends::cuda::sequence_desc);
    MOBA_CUDA_CHECK(cudaEventSynchronize(staged_));
    if (table_bytes > staging_bytes_) {
      if (staging_ != nullptr) MOBA_CUDA_CHECK(cudaFreeHost(staging_));
      staging_ = nullptr;
      MOBA_CUDA_CHECK(cudaMallocHost(&staging_, table_bytes));
      staging_bytes_ = table_bytes;
    }
    std::memcpy(staging_, table_.data(), table_bytes);
    MOBA_CUDA_CHECK(cudaMemcpyAsync(table, staging_, table_bytes, cudaMemcpyHostToDevice, stream));
    MOBA_CUDA_CHECK(cudaEventRecord(staged_, stream));
  }

  /// The block means and the fused gate (SPEC §Blocks 2–5), which also counts each row into the slots.
  void gate(const core::fwd_params<Dtype>& p, const backends::cuda::call_bounds& b, const backends::cuda::workspace_layout& w,
            const backends::cuda::sequence_desc* table, unsigned char* ws, const backends::cuda::slot_tally& tally,
            cudaStream_t stream) {
    namespace c = backends::cuda;
    auto* kbar = reinterpret_cast<bfloat16*>(ws + w.kbar);
    auto* sel = reinterpret_cast<std::int32_t*>(ws + w.sel);
    auto* ready = reinterpret_cast<unsigned*>(ws + w.ready);
    if (gate_before_ != nullptr) MOBA_CUDA_CHECK(cudaEventRecord(gate_before_, stream));
    core::with_head_dim(
        head_dim_list{}, p.head_dim,
        [&](auto dim) {
          constexpr int D = decltype(dim)::value;
          // On sm_90+ the tensor-core gate starts beside the block means (programmatic dependent
          // launch) and waits for the blocks it reads. The means then run on half the SMs, one CTA
          // each: they stay ahead of the gate's needs without taking the DRAM bandwidth from its
          // query loads (all SMs: same at 32K, 4% slower gating at 128K and 512K; a quarter: 27%
          // slower at 32K).
          const bool overlap = tensor_cores && major_ >= 9;
          const std::int64_t units = b.blocks * p.kv_heads;
          const std::int64_t means_ctas = overlap ? std::min<std::int64_t>(units, std::max(1, sms_ / 2)) : units;
          c::block_means_kernel<Dtype, D><<<grid(means_ctas), c::means_threads, 0, stream>>>(p, table, kbar, ready);
          c::check_launch("block_means_kernel");
          const auto smem = static_cast<int>(c::gate_smem<Dtype, D>::launch_bytes(p.top_k));
          auto launch_gate = [&](auto kernel) {
            MOBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            cudaLaunchAttribute beside_means{};
            beside_means.id = cudaLaunchAttributeProgrammaticStreamSerialization;
            beside_means.val.programmaticStreamSerializationAllowed = 1;
            cudaLaunchConfig_t launch{};
            launch.gridDim = grid(b.tiles * p.q_heads);
            launch.blockDim = c::attention_threads;
            launch.dynamicSmemBytes = static_cast<std::size_t>(smem);
            launch.stream = stream;
            launch.attrs = &beside_means;
            launch.numAttrs = overlap ? 1 : 0;
            c::check(cudaLaunchKernelEx(&launch, kernel, p, table, static_cast<const bfloat16*>(kbar),
                                        static_cast<const unsigned*>(ready), sel, tally),
                     "gate_kernel");
          };
          if (p.top_k - 1 <= c::gate_list_keys / 2) launch_gate(c::gate_kernel<Dtype, D, c::gate_list_keys / 2>);
          else if (p.top_k - 1 <= c::gate_list_keys) launch_gate(c::gate_kernel<Dtype, D, c::gate_list_keys>);
          else launch_gate(c::gate_kernel<Dtype, D, 0>);
        },
        [] {});
    if (gate_after_ != nullptr) MOBA_CUDA_CHECK(cudaEventRecord(gate_after_, stream));
  }

  /// Scan every slot's rows per (kv head, block), which the gate counted; then slot by slot, list the
  /// rows and attend each list to its block, merging into out and the log2-sum-exp buffer (slot 0
  /// writes them first).
  template <int D>
  void history_passes(const core::fwd_params<Dtype>& p, const backends::cuda::call_bounds& b,
                      const backends::cuda::workspace_layout& w, const backends::cuda::sequence_desc* table,
                      const std::int32_t* sel, unsigned char* ws, unsigned* tickets, float scale_log2, cudaStream_t stream) {
    namespace c = backends::cuda;
    const std::int64_t row_heads = b.rows * p.q_heads, keys = p.kv_heads * w.total_blocks;
    auto* counts = reinterpret_cast<std::int32_t*>(ws + w.counts);
    auto* start = reinterpret_cast<std::int32_t*>(ws + w.start);
    auto* tile_count = reinterpret_cast<std::int64_t*>(ws + w.tile_count);
    auto* tile_list = reinterpret_cast<c::list_tile*>(ws + w.tile_list);
    auto* rows = reinterpret_cast<std::int32_t*>(ws + w.rows);
    const unsigned entry_grid = grid((row_heads + 255) / 256), tile_grid = persistent_grid(w.history_tiles);
    const int max_span = static_cast<int>(std::max<std::int64_t>(1, c::max_joined_keys / p.block_size));
    c::scan_slots_kernel<<<grid(w.passes), c::scan_threads, 0, stream>>>(counts, keys, start, tile_count, tile_list,
                                                                          w.history_tiles, table, p.seqs.count,
                                                                          w.total_blocks, max_span);
    c::check_launch("scan_slots_kernel");
    for (std::int64_t slot = 0; slot < w.passes; ++slot) {
      const c::slot_lists lists{tile_count + slot, tile_list + slot * w.history_tiles, rows, w.total_blocks, sel, slot};
      c::scatter_slot_kernel<Dtype><<<entry_grid, 256, 0, stream>>>(p, table, sel, slot, w.total_blocks, start + slot * w.counters,
                                                                    counts + slot * w.counters, rows);
      c::check_launch("scatter_slot_kernel");
      const c::epilogue ep{reinterpret_cast<float*>(ws + w.lse2), slot > 0, false};
      c::attention_kernel<Dtype, D><<<tile_grid, c::attention_threads, c::attention_smem<Dtype, D>::launch_bytes, stream>>>(
          p, table, c::history_items{lists}, ep, scale_log2, tickets + slot);
      c::check_launch("attention_kernel (history blocks)");
    }
  }

  /// CTAs of a persistent attention kernel over `items` work items: one per SM (the kernel's
  /// occupancy), or the caller's limit.
  unsigned persistent_grid(std::int64_t items) const {
    return static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(items, max_ctas_ > 0 ? max_ctas_ : sms_)));
  }

  static unsigned grid(std::int64_t n) {
    detail::require(n < (std::int64_t{1} << 31), "moba::cuda: grid of ", n, " blocks is too large");
    return static_cast<unsigned>(std::max<std::int64_t>(n, 1));
  }

  /// The object's workspace: set_workspace's, or the owned one grown (stream-ordered, no device
  /// sync) to `bytes`.
  unsigned char* workspace(std::int64_t bytes, cudaStream_t stream) {
    if (user_ != nullptr) return user_;
    if (bytes > owned_bytes_) {
      if (owned_ != nullptr) MOBA_CUDA_CHECK(cudaFreeAsync(owned_, stream));
      owned_ = nullptr;
      void* fresh = nullptr;
      MOBA_CUDA_CHECK(cudaMallocAsync(&fresh, static_cast<std::size_t>(bytes), stream));
      owned_ = static_cast<unsigned char*>(fresh);
      owned_bytes_ = bytes;
    }
    return owned_;
  }

  cudaStream_t stream_ = nullptr;
  int major_ = 0, sms_ = 1, max_ctas_ = 0;
  std::vector<backends::cuda::sequence_desc> table_;  // host offsets: guarded by staging_mutex_
  unsigned char* owned_ = nullptr;
  std::int64_t owned_bytes_ = 0;
  unsigned char* user_ = nullptr;
  std::int64_t user_bytes_ = 0;
  std::mutex staging_mutex_;
  void* staging_ = nullptr;
  std::size_t staging_bytes_ = 0;
  cudaEvent_t staged_ = nullptr;
  cudaEvent_t gate_before_ = nullptr, gate_after_ = nullptr;
};

}  // namespace moba
