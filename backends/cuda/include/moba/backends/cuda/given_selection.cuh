// SPDX-License-Identifier: MIT
/// @file A selection handed in (SPEC §Blocks 7) in place of the gate's: copied into the gate's
/// workspace format and counted into the history slots as the gate counts its own (slots.cuh).
#pragma once

#include <cmath>
#include <cstdint>

#include <moba/backends/cuda/element.cuh>
#include <moba/backends/cuda/sequences.hpp>
#include <moba/backends/cuda/slots.cuh>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cuda {

/// A thread per (row, head) x = row · Hq + h. Nothing has checked the entries, so only those that
/// are history blocks of the query (in [0, c)) and ascend are kept, at most history_count of them
/// (p.top_k is the selection's width here); they go to slots 0, 1, … of `sel` (selection_index),
/// then the current block, then -1, so that each block is attended once and every read stays in
/// bounds. A row with history slots but no entry kept gets out = 0 and lse2 = -inf: the current
/// blocks' pass merges every such row with what the history passes left.
template <class T>
__global__ void given_selection_kernel(core::fwd_params<T> p, const sequence_desc* table, std::int32_t* sel,
                                       slot_tally tally, float* lse2) {
  const std::int64_t x = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= table[p.seqs.count].row_offset * p.q_heads) return;
  const std::int64_t row = x / p.q_heads, h = x % p.q_heads;
  const sequence_desc e = table[find_sequence(table, p.seqs.count, row, [](const sequence_desc& d) { return d.row_offset; })];
  const std::int64_t i = row - e.row_offset, t = e.seq.q_start + i, c = core::current_block(e.seq.pos(i), p.block_size);
  const std::int64_t most = core::history_count(c, p.top_k, false);
  std::int64_t kept = 0, last = -1;
  for (std::int64_t w = 0; w < p.selection.extent[3] && kept < most; ++w) {
    const std::int64_t j = p.selection(e.seq.batch, t, h, w);
    if (j <= last || j >= c) continue;
    sel[selection_index(row, h, kept, p.q_heads, p.top_k)] = static_cast<std::int32_t>(j);
    if (tally.counts != nullptr)
      atomicAdd(&tally.counts[kept * tally.counters + slot_counter(x, list_key(p.kv_head(h), tally.total_blocks, e, j))], 1);
    last = j;
    ++kept;
  }
  for (std::int64_t w = kept; w < p.top_k; ++w)
    sel[selection_index(row, h, w, p.q_heads, p.top_k)] = w == kept ? static_cast<std::int32_t>(c) : -1;
  if (kept == 0 && most > 0 && lse2 != nullptr) {
    lse2[x] = -INFINITY;
    for (std::int64_t d = 0; d < p.head_dim; ++d) p.out(e.seq.batch, t, h, d) = from_float<T>(0.f);
  }
}

}  // namespace moba::backends::cuda
