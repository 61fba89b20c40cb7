// SPDX-License-Identifier: MIT
/// @file A paged KV cache with running per-block key sums, for decode (SPEC §Decode with a KV cache).
#pragma once

#include <cstdint>
#include <span>

#include <moba/dtype.hpp>
#include <moba/tensor_view.hpp>

namespace moba {

/// Past keys and values of `batch` sequences in fixed-size pages, as vLLM and flash-attention's
/// `block_table` lay them out. Token `t` of sequence `b` lives in page `page_table(b, t / page_size)`,
/// slot `t % page_size`. `block_key_sums(b, j, h, :)` is the sum of the keys of MoBA block `j`
/// (block_size tokens, not page_size) so that gating a new token costs O(blocks·D), not O(k_len·D).
/// The page table and lengths are host arrays; the pages and sums live where the backend computes.
template <class Dtype>
struct paged_kv_cache {
  view4<Dtype> k_pages;                             // [num_pages, page_size, Hkv, D]
  view4<Dtype> v_pages;                             // [num_pages, page_size, Hkv, D]
  tensor_view<gate_t<Dtype>, 4> block_key_sums;     // [batch, max_blocks, Hkv, D]
  tensor_view<const std::int32_t, 2> page_table;    // [batch, max_pages_per_sequence]
  std::span<const std::int32_t> seqlens;            // tokens cached per sequence before the call
};

}  // namespace moba
