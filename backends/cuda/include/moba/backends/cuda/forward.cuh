// SPDX-License-Identifier: MIT
/// @file moba::cuda: backend_impl<cuda, Dtype> (bf16/f16 on tensor cores, float on CUDA cores): the
/// workspace, the per-call sequence table upload and the launches. The only CUDA-runtime caller.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <moba/attention.hpp>
#include <moba/backends/cuda/attention.cuh>
#include <moba/backends/cuda/check.hpp>
#include <moba/backends/cuda/gate.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/slots.cuh>
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

/// The sequence table of a call, and the layout of the workspace it needs.
template <class T>
workspace_layout plan(const core::fwd_params<T>& p, std::vector<sequence_desc>* table) {
  std::vector<sequence_desc> local;
  std::vector<sequence_desc>& tab = table ? *table : local;
  tab.assign(p.seqs.count + 1, {});
  std::int64_t most_history = 0;
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    tab[s].seq = seq;
    tab[s + 1].block_offset = tab[s].block_offset + core::block_count(seq.k_len, p.block_size);
    tab[s + 1].tile_offset = tab[s].tile_offset + (seq.q_len + tile_rows - 1) / tile_rows;
    tab[s + 1].row_offset = tab[s].row_offset + seq.q_len;
    if (seq.q_len > 0)
      most_history = std::max(most_history, core::history_count(core::current_block(seq.pos(seq.q_len - 1), p.block_size),
                                                                 p.top_k, false));
  }
  const sequence_desc& totals = tab[p.seqs.count];
  workspace_layout w;
  w.total_blocks = totals.block_offset;
  std::int64_t at = align256(static_cast<std::int64_t>(tab.size() * sizeof(sequence_desc)));
  auto take = [&](std::int64_t& where, std::int64_t bytes) {
    where = at;
    at += align256(bytes);
  };
  const std::int64_t row_heads = totals.row_offset * p.q_heads, keys = p.kv_heads * w.total_blocks;
  const bool tensor_cores = !std::is_same_v<T, float>;
  w.passes = tensor_cores && !p.full ? most_history : 0;
  if (w.passes > 0) {  // the row lists hold int32 keys, entries and offsets
    detail::require(keys < (std::int64_t{1} << 31), "moba::cuda: ", keys, " key blocks (times kv heads) is too many");
    detail::require(row_heads < (std::int64_t{1} << 31), "moba::cuda: ", row_heads, " query rows (times heads) is too many");
  }
  // One work ticket per attention launch (history passes, then the current blocks), right after them
  // the slot counts and the block means' flags: one memset zeroes all three.
  take(w.tickets, tensor_cores ? (w.passes + 1) * 4 : 0);
  w.counters = keys * count_shards;
  take(w.counts, w.passes * w.counters * 4);
  take(w.ready, p.full ? 0 : keys * 4);
  w.zeroed = at - w.tickets;
  if (!p.full) {
    take(w.kbar, w.total_blocks * p.kv_heads * kbar_pieces * p.head_dim * 2);
    take(w.sel, row_heads * p.top_k * 4);
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

inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

}  // namespace moba::backends::cuda

namespace moba {

/// The CUDA backend. Construct through `moba::attention<moba::cuda, Dtype> attn(cfg, stream)`.
/// Tensors are device pointers; cu_seqlens stay host arrays (the validator reads them), and the
/// per-sequence table built from them is uploaded on `stream` through a pinned staging buffer.
/// Work is enqueued on `stream` without synchronising the device; growing the owned workspace
/// uses stream-ordered cudaMallocAsync/cudaFreeAsync, so the stream must outlive the object (its
/// destructor frees the workspace on it). Errors throw moba::device_error.
template <class Dtype>
struct backend_impl<cuda, Dtype> {
  static constexpr const char* name = "moba::cuda";
  using head_dim_list = core::head_dim_list<64, 128>;
  static constexpr bool tensor_cores = !std::is_same_v<Dtype, float>;

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
  /// Later calls run on `s`. They reuse the workspace of the calls before, so what still runs on the
  /// old stream must be ordered before them (an event, or a synchronisation).
  void set_stream(cudaStream_t s) { stream_ = s; }

  /// Device workspace bytes a forward call with these parameters needs (sequence table, block means,
  /// selections, and the sparse kernel's per-CTA scratch).
  std::int64_t workspace_size(const core::fwd_params<Dtype>& p) const {
    return backends::cuda::plan(p, nullptr).total;
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

  void check(const core::fwd_params<Dtype>& p) const {
    detail::require(major_ >= 8, name, " needs compute capability >= 8.0 (bf16 tensor cores, also for the gate); this device has ",
                    major_, ".x");
    detail::require(p.full || p.top_k <= backends::cuda::max_top_k, name, " supports top_k <= ",
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
      aligned(p.out, "out");
    }
    if (user_ != nullptr) {
      const std::int64_t need = workspace_size(p);
      detail::require(need <= user_bytes_, name, " workspace of ", user_bytes_, " bytes is too small: this call needs ", need);
    }
  }

  void forward(const core::fwd_params<Dtype>& p) {
    namespace c = backends::cuda;
    const c::workspace_layout w = c::plan(p, &table_);
    const c::sequence_desc& totals = table_[p.seqs.count];
    if (totals.row_offset == 0) return;
    unsigned char* ws = workspace(w.total);

    // Upload the sequence table through pinned memory; wait only for the previous call's copy from it.
    const std::size_t table_bytes = table_.size() * sizeof(c::sequence_desc);
    if (table_bytes > staging_bytes_) {
      MOBA_CUDA_CHECK(cudaEventSynchronize(staged_));
      if (staging_ != nullptr) MOBA_CUDA_CHECK(cudaFreeHost(staging_));
      staging_ = nullptr;
      MOBA_CUDA_CHECK(cudaMallocHost(&staging_, table_bytes));
      staging_bytes_ = table_bytes;
    }
    MOBA_CUDA_CHECK(cudaEventSynchronize(staged_));
    std::memcpy(staging_, table_.data(), table_bytes);
    auto* table = reinterpret_cast<c::sequence_desc*>(ws + w.table);
    MOBA_CUDA_CHECK(cudaMemcpyAsync(table, staging_, table_bytes, cudaMemcpyHostToDevice, stream_));
    MOBA_CUDA_CHECK(cudaEventRecord(staged_, stream_));
    auto* tickets = reinterpret_cast<unsigned*>(ws + w.tickets);
    if (w.zeroed > 0) MOBA_CUDA_CHECK(cudaMemsetAsync(tickets, 0, w.zeroed, stream_));

    const auto q_heads = static_cast<unsigned>(p.q_heads);
    std::int32_t* sel = nullptr;
    if (!p.full) {
      auto* kbar = reinterpret_cast<bfloat16*>(ws + w.kbar);
      sel = reinterpret_cast<std::int32_t*>(ws + w.sel);
      auto* ready = reinterpret_cast<unsigned*>(ws + w.ready);
      if (gate_before_ != nullptr) MOBA_CUDA_CHECK(cudaEventRecord(gate_before_, stream_));
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
            const std::int64_t units = totals.block_offset * p.kv_heads;
            const std::int64_t means_ctas = overlap ? std::min<std::int64_t>(units, std::max(1, sms_ / 2)) : units;
            c::block_means_kernel<Dtype, D><<<grid(means_ctas), c::means_threads, 0, stream_>>>(p, table, kbar, ready);
            c::check_launch("block_means_kernel");
            const auto smem = static_cast<int>(c::gate_smem<Dtype, D>::launch_bytes(p.top_k));
            const c::slot_tally tally{w.passes > 0 ? reinterpret_cast<std::int32_t*>(ws + w.counts) : nullptr,
                                      w.counters, w.total_blocks};
            auto gate = [&](auto kernel) {
              MOBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
              cudaLaunchAttribute beside_means{};
              beside_means.id = cudaLaunchAttributeProgrammaticStreamSerialization;
              beside_means.val.programmaticStreamSerializationAllowed = 1;
              cudaLaunchConfig_t launch{};
              launch.gridDim = grid(totals.tile_offset * p.q_heads);
              launch.blockDim = c::attention_threads;
              launch.dynamicSmemBytes = static_cast<std::size_t>(smem);
              launch.stream = stream_;
              launch.attrs = &beside_means;
              launch.numAttrs = overlap ? 1 : 0;
              c::check(cudaLaunchKernelEx(&launch, kernel, p, static_cast<const c::sequence_desc*>(table),
                                          static_cast<const bfloat16*>(kbar), static_cast<const unsigned*>(ready), sel, tally),
                       "gate_kernel");
            };
            if (p.top_k - 1 <= c::gate_list_keys / 2) gate(c::gate_kernel<Dtype, D, c::gate_list_keys / 2>);
            else if (p.top_k - 1 <= c::gate_list_keys) gate(c::gate_kernel<Dtype, D, c::gate_list_keys>);
            else gate(c::gate_kernel<Dtype, D, 0>);
          },
          [] {});
      if (gate_after_ != nullptr) MOBA_CUDA_CHECK(cudaEventRecord(gate_after_, stream_));
    } else if (p.selected.given()) {
      c::full_selection_kernel<Dtype><<<dim3(grid((totals.row_offset + 127) / 128), q_heads), 128, 0, stream_>>>(p, table);
      c::check_launch("full_selection_kernel");
    }

    const float scale = static_cast<float>(p.softmax_scale);
    if constexpr (!tensor_cores) {
      const std::int64_t warps = totals.row_offset * p.q_heads;
      c::simt_kernel<Dtype><<<grid((warps + 3) / 4), 128, 0, stream_>>>(p, table, sel, scale);
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
              history_passes<D>(p, w, table, sel, ws, tickets, scale_log2);
            }
            MOBA_CUDA_CHECK(cudaFuncSetAttribute(c::attention_kernel<Dtype, D, c::causal_items>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            c::attention_kernel<Dtype, D><<<persistent_grid(totals.tile_offset * p.q_heads), c::attention_threads, smem, stream_>>>(
                p, table, c::causal_items{totals.tile_offset}, last, scale_log2, tickets + w.passes);
            c::check_launch("attention_kernel (current blocks)");
          },
          [] {});
    }
  }

 private:
  /// Scan every slot's rows per (kv head, block), which the gate counted; then slot by slot, list the
  /// rows and attend each list to its block, merging into out and the log2-sum-exp buffer (slot 0
  /// writes them first).
  template <int D>
  void history_passes(const core::fwd_params<Dtype>& p, const backends::cuda::workspace_layout& w,
                      const backends::cuda::sequence_desc* table, const std::int32_t* sel, unsigned char* ws,
                      unsigned* tickets, float scale_log2) {
    namespace c = backends::cuda;
    const std::int64_t row_heads = table_[p.seqs.count].row_offset * p.q_heads, keys = p.kv_heads * w.total_blocks;
    auto* counts = reinterpret_cast<std::int32_t*>(ws + w.counts);
    auto* start = reinterpret_cast<std::int32_t*>(ws + w.start);
    auto* tile_count = reinterpret_cast<std::int64_t*>(ws + w.tile_count);
    auto* tile_list = reinterpret_cast<c::list_tile*>(ws + w.tile_list);
    auto* rows = reinterpret_cast<std::int32_t*>(ws + w.rows);
    const unsigned entry_grid = grid((row_heads + 255) / 256), tile_grid = persistent_grid(w.history_tiles);
    const int max_span = static_cast<int>(std::max<std::int64_t>(1, c::max_joined_keys / p.block_size));
    c::scan_slots_kernel<<<grid(w.passes), c::scan_threads, 0, stream_>>>(counts, keys, start, tile_count, tile_list,
                                                                           w.history_tiles, table, p.seqs.count,
                                                                           w.total_blocks, max_span);
    c::check_launch("scan_slots_kernel");
    for (std::int64_t slot = 0; slot < w.passes; ++slot) {
      const c::slot_lists lists{tile_count + slot, tile_list + slot * w.history_tiles, rows, w.total_blocks, sel, slot};
      c::scatter_slot_kernel<Dtype><<<entry_grid, 256, 0, stream_>>>(p, table, sel, slot, w.total_blocks, start + slot * w.counters,
                                                                     counts + slot * w.counters, rows);
      c::check_launch("scatter_slot_kernel");
      const c::epilogue ep{reinterpret_cast<float*>(ws + w.lse2), slot > 0, false};
      c::attention_kernel<Dtype, D><<<tile_grid, c::attention_threads, c::attention_smem<Dtype, D>::launch_bytes, stream_>>>(
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
    return static_cast<unsigned>(n);
  }

  /// The caller's workspace, or the owned one grown (stream-ordered, no device sync) to `bytes`.
  unsigned char* workspace(std::int64_t bytes) {
    if (user_ != nullptr) return user_;
    if (bytes > owned_bytes_) {
      if (owned_ != nullptr) MOBA_CUDA_CHECK(cudaFreeAsync(owned_, stream_));
      owned_ = nullptr;
      void* fresh = nullptr;
      MOBA_CUDA_CHECK(cudaMallocAsync(&fresh, static_cast<std::size_t>(bytes), stream_));
      owned_ = static_cast<unsigned char*>(fresh);
      owned_bytes_ = bytes;
    }
    return owned_;
  }

  cudaStream_t stream_ = nullptr;
  int major_ = 0, sms_ = 1, max_ctas_ = 0;
  std::vector<backends::cuda::sequence_desc> table_;
  unsigned char* owned_ = nullptr;
  std::int64_t owned_bytes_ = 0;
  unsigned char* user_ = nullptr;
  std::int64_t user_bytes_ = 0;
  void* staging_ = nullptr;
  std::size_t staging_bytes_ = 0;
  cudaEvent_t staged_ = nullptr;
  cudaEvent_t gate_before_ = nullptr, gate_after_ = nullptr;
};

}  // namespace moba
