// SPDX-License-Identifier: MIT
/// @file Per-thread scratch of the CPU kernel, grown on demand and reused across calls.
#pragma once

#include <cstdint>
#include <vector>

#include <xsimd/xsimd.hpp>

namespace moba::backends::cpu {

template <class A>
using aligned_vector = std::vector<A, xsimd::aligned_allocator<A>>;

/// Everything one work item (a query tile of one kv-head group) needs; sized for the largest seen.
template <class A>
struct tile_workspace {
  aligned_vector<A> q;             // [rows, Dp] queries in the compute type
  aligned_vector<A> o;             // [rows, Dp] running output
  std::vector<A> m;                // [rows] running max of the online softmax
  aligned_vector<A> l;             // [rows, SIMD width] its running sum, per lane
  std::vector<std::int64_t> pos;   // [rows] absolute position of each row's query
  std::vector<std::int64_t> selection;  // [rows, width] selected blocks, ascending (width <= blocks)
  std::vector<std::int64_t> count;      // [rows] blocks selected per row
  std::vector<A> score_scratch;          // top-n scratch
  std::vector<std::int64_t> block_rows;  // rows of each block, grouped by block (CSR)
  std::vector<std::int64_t> block_start; // [blocks + 1] offsets into block_rows
  std::vector<std::int64_t> chunk_rows;  // rows of the current chunk
  aligned_vector<A> k_packed;      // [Dp, chunk_keys] transposed key chunk
  aligned_vector<A> v_chunk;       // [chunk_keys, Dp]
  aligned_vector<A> scores;        // [rows_per_tile, chunk_keys]
  // bf16 inputs on AVX512-BF16 (dot_bf16.hpp): queries and the chunk kept as bf16 bits.
  aligned_vector<std::uint16_t> q16;  // [rows, Dp]
  aligned_vector<std::uint16_t> k16;  // [Dp/2, chunk_keys, 2]
  aligned_vector<std::uint16_t> v16;  // [chunk_keys/2, Dp, 2]
};

template <class V>
void grow(V& v, std::size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace moba::backends::cpu
