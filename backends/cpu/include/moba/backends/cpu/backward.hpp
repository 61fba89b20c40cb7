// SPDX-License-Identifier: MIT
/// @file The CPU backward pass (SPEC §Backward), flash-style and deterministic. Two passes over the
/// attended pairs, each sum owned by one work item so that no order depends on the schedule:
/// - key-block major: an item owns one key block of one kv head; it gathers the (token, head) rows
///   that selected the block and accumulates the block's dk and dv in registers and scratch;
/// - query-tile major: an item owns a query tile (as in the forward) and accumulates its rows' dq.
/// Both recompute P = exp(scale·q·k − lse) and dP = dout·vᵀ; δ = rowsum(dout ∘ out) comes first.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <xsimd/xsimd.hpp>

#include <moba/backends/cpu/dot_bf16.hpp>
#include <moba/backends/cpu/kernel.hpp>
#include <moba/backends/cpu/simd.hpp>
#include <moba/backends/cpu/threads.hpp>
#include <moba/backends/cpu/tiling.hpp>
#include <moba/backends/cpu/workspace.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cpu {

/// Scratch of one backward work item; sized for the largest seen, reused across calls.
template <class A>
struct backward_workspace {
  aligned_vector<A> q, dout, dq;       // [rows, Dp] a query tile's rows (query pass)
  aligned_vector<A> qT, doutT;         // [Dp, chunk] a chunk of rows, transposed (key pass)
  aligned_vector<A> keys, values;      // [block, Dp] a key block widened (key pass)
  aligned_vector<A> dk, dv;            // [block, Dp] its gradients
  aligned_vector<A> kT, vT, k_chunk;   // [Dp, chunk] and [chunk, Dp] a key chunk (query pass)
  aligned_vector<A> value_row;         // [Dp] one value being transposed
  aligned_vector<A> s, ds;             // [tile rows, chunk] P and dS of one register tile
  aligned_vector<A> chunk_lse, chunk_delta, chunk_pos;  // [chunk] per row of a chunk (key pass)
  std::vector<A> lse, delta;                            // [rows] (query pass)
  // bf16 inputs on AVX512-BF16 (dot_bf16.hpp): bf16 bits, rows padded to Dp, or the pair layouts.
  aligned_vector<std::uint16_t> q16, dout16;           // [rows, Dp] (query pass)
  aligned_vector<std::uint16_t> k16, v16, k_value16;   // key chunk: kᵀ, vᵀ as keys, k as values
  aligned_vector<std::uint16_t> keys16, values16;      // [block, Dp] (key pass)
  aligned_vector<std::uint16_t> qT16, doutT16, q_value16, dout_value16;  // a chunk of rows (key pass)
  std::vector<std::int64_t> pos, block_rows, block_start, chunk_rows;
};

/// Which rows selected each key block of one (sequence, kv head): rows are `i·group + g` (query token
/// i of the sequence, query head g of the group), ascending within each block.
struct block_rows_index {
  std::vector<std::int64_t> start;  // per (sequence, kv head): offset of its [blocks + 1] starts
  std::vector<std::int64_t> rows;   // the rows, grouped by (sequence, kv head, block)
  std::vector<std::int64_t> bounds;  // per (sequence, kv head, block) + 1: offsets into rows
};

/// A key block of one kv head of one sequence, and the number of rows that selected it.
struct key_block_item {
  std::int64_t seq, kv, block, rows;
};

/// State kept across backward calls (no allocation once grown): δ, the index, the work lists.
template <class A>
struct backward_state {
  std::vector<A> delta;  // [batch, q_tokens, Hq]
  block_rows_index index;
  std::vector<std::int64_t> rows_start;  // per (sequence, kv head) + 1: offsets into index.rows
  std::vector<key_block_item> key_items;
  std::vector<work_item> query_items;
  per_thread<backward_workspace<A>> scratch;
};

/// The blocks query token i (head h) of `seq` attends: from the selection view, or, in full mode
/// without one, every block up to its current block. Calls f(j) in ascending order.
template <class T, class F>
void for_each_selected(const core::bwd_params<T>& p, const tensor_view<const std::int32_t, 4>& sel,
                       const sequence_info& seq, std::int64_t i, std::int64_t h, F&& f) {
  if (!sel.given()) {
    for (std::int64_t j = 0; j <= core::current_block(seq.pos(i), p.block_size); ++j) f(j);
    return;
  }
  for (std::int64_t w = 0; w < sel.extent[3]; ++w) {
    const std::int32_t j = sel(seq.batch, seq.q_start + i, h, w);
    if (j < 0) return;
    f(static_cast<std::int64_t>(j));
  }
}

/// One vector of scores `s` and of dP = dout·v `dp`, in place: P = exp(scale·s − lse) and
/// dS = P ∘ (dP − δ) where `attended`, exactly 0 elsewhere (a masked pair may hold anything).
template <class A>
void softmax_grad(A* s, A* dp, xsimd::batch<A> scale, xsimd::batch<A> lse, xsimd::batch<A> delta,
                  xsimd::batch_bool<A> attended) {
  using batch = xsimd::batch<A>;
  const batch p = xsimd::select(attended, xsimd::exp(batch::load_aligned(s) * scale - lse), batch(A(0)));
  const batch ds = xsimd::select(attended, p * (batch::load_aligned(dp) - delta), batch(A(0)));
  p.store_aligned(s);
  ds.store_aligned(dp);
}

/// Key pass: dk and dv of block j of kv head kv of `seq`, from the `n` rows `row(x)` that selected it.
template <class T, class A, class Row>
void key_block_grad(const core::bwd_params<T>& p, const A* delta, const sequence_info& seq, std::int64_t kv,
                    std::int64_t j, std::int64_t n, Row&& row, backward_workspace<A>& w) {
  using tile = register_tile<A>;
  using batch = typename tile::batch;
  constexpr std::int64_t chunk = tile::chunk_keys;
  const std::int64_t group = p.q_heads / p.kv_heads, d = p.head_dim, dp = padded_dim<A>(d);
  const std::int64_t b = core::block_begin(j, p.block_size), e = core::block_end(j, p.block_size, seq.k_len);
  const std::int64_t keys = e - b;
  grow(w.keys, keys * dp);
  grow(w.values, keys * dp);
  grow(w.dk, keys * dp);
  grow(w.dv, keys * dp);
  grow(w.q, chunk * dp);
  grow(w.dout, chunk * dp);
  grow(w.qT, dp * chunk);
  grow(w.doutT, dp * chunk);
  grow(w.s, tile::rows * chunk);
  grow(w.ds, tile::rows * chunk);
  grow(w.chunk_lse, chunk);
  grow(w.chunk_delta, chunk);
  grow(w.chunk_pos, chunk);
  std::fill_n(w.dk.data(), keys * dp, A(0));
  std::fill_n(w.dv.data(), keys * dp, A(0));
  // Keys a row cannot see (past every row's position) get zero gradients; the rest are widened (and
  // for bf16 dot products kept as bits, unless a value is too small for vdpbf16ps).
  const std::int64_t seen = n == 0 ? 0 : std::min(keys, seq.pos(row(n - 1) / group) - b + 1);
  bool block_dot16 = false;
  if constexpr (bf16_dot<T, A>) {
    grow(w.keys16, keys * dp);
    grow(w.values16, keys * dp);
    grow(w.qT16, dp * chunk);
    grow(w.doutT16, dp * chunk);
    grow(w.q_value16, chunk * dp);
    grow(w.dout_value16, chunk * dp);
    block_dot16 = true;
    for (std::int64_t t = 0; t < seen; ++t) {
      const bool tiny_key = bf16::copy_bits(&p.k(seq.batch, seq.k_start + b + t, kv, 0), d, dp, w.keys16.data() + t * dp);
      const bool tiny_value = bf16::copy_bits(&p.v(seq.batch, seq.k_start + b + t, kv, 0), d, dp, w.values16.data() + t * dp);
      block_dot16 = block_dot16 && !tiny_key && !tiny_value;
    }
  }
  for (std::int64_t t = 0; t < seen; ++t) {
    widen_row<A>(&p.k(seq.batch, seq.k_start + b + t, kv, 0), w.keys.data() + t * dp, d, dp);
    widen_row<A>(&p.v(seq.batch, seq.k_start + b + t, kv, 0), w.values.data() + t * dp, d, dp);
  }
  const batch scale(static_cast<A>(p.softmax_scale));
  const A* key_rows[tile::rows];
  const A* value_rows[tile::rows];
  const std::uint16_t* key_rows16[tile::rows];
  const std::uint16_t* value_rows16[tile::rows];
  A* dk_rows[tile::rows];
  A* dv_rows[tile::rows];
  for (std::int64_t x0 = 0; x0 < n; x0 += chunk) {
    const std::int64_t m = std::min(chunk, n - x0);
    // bf16 dot products unless a value of the block or of the chunk's rows is too small for them.
    bool dot16 = block_dot16;
    if constexpr (bf16_dot<T, A>) {
      for (std::int64_t y = 0; y < m && dot16; ++y) {
        const std::int64_t r = row(x0 + y), h = kv * group + r % group, t = seq.q_start + r / group;
        dot16 = !bf16::has_tiny(&p.q(seq.batch, t, h, 0), d) && !bf16::has_tiny(&p.dout(seq.batch, t, h, 0), d);
      }
      if (dot16 && (m < chunk || dp > d))
        for (auto* packed : {&w.qT16, &w.doutT16, &w.q_value16, &w.dout_value16})
          std::fill_n(packed->data(), dp * chunk, std::uint16_t{0});
    }
    // The chunk's rows: queries and output gradients straight and transposed (or in the bf16 pair
    // layouts), zero past m.
    if (!dot16 && (m < chunk || dp > d)) {
      std::fill_n(w.qT.data(), dp * chunk, A(0));
      std::fill_n(w.doutT.data(), dp * chunk, A(0));
    }
    std::int64_t last_pos = -1;
    for (std::int64_t y = 0; y < chunk; ++y) {
      A* q = w.q.data() + y * dp;
      A* g = w.dout.data() + y * dp;
      if (y >= m) {
        if (!dot16) {
          std::fill_n(q, dp, A(0));
          std::fill_n(g, dp, A(0));
        }
        w.chunk_lse[y] = w.chunk_delta[y] = A(0);
        w.chunk_pos[y] = A(-1);
        continue;
      }
      const std::int64_t r = row(x0 + y), i = r / group, h = kv * group + r % group, t = seq.q_start + i;
      if constexpr (bf16_dot<T, A>) {
        if (dot16) {
          bf16::pack_key(&p.q(seq.batch, t, h, 0), y, d, w.qT16.data());
          bf16::pack_key(&p.dout(seq.batch, t, h, 0), y, d, w.doutT16.data());
          bf16::pack_value(&p.q(seq.batch, t, h, 0), y, d, dp, w.q_value16.data());
          bf16::pack_value(&p.dout(seq.batch, t, h, 0), y, d, dp, w.dout_value16.data());
        }
      }
      if (!dot16) {
        widen_row<A>(&p.q(seq.batch, t, h, 0), q, d, dp);
        widen_row<A>(&p.dout(seq.batch, t, h, 0), g, d, dp);
        for (std::int64_t x = 0; x < d; ++x) {
          w.qT[x * chunk + y] = q[x];
          w.doutT[x * chunk + y] = g[x];
        }
      }
      w.chunk_lse[y] = static_cast<A>(p.lse(seq.batch, t, h));
      w.chunk_delta[y] = delta[(seq.batch * p.q.extent[1] + t) * p.q_heads + h];
      w.chunk_pos[y] = static_cast<A>(std::min(seq.pos(i) - b, keys));  // exact in float: at most the block
      last_pos = seq.pos(i);
    }
    const std::int64_t keys_seen = std::min(keys, last_pos - b + 1);  // keys some row of the chunk sees
    for (std::int64_t t0 = 0; t0 < keys_seen; t0 += tile::rows) {
      const std::int64_t count = std::min<std::int64_t>(tile::rows, keys_seen - t0);
      for (std::int64_t y = 0; y < count; ++y) {
        key_rows[y] = w.keys.data() + (t0 + y) * dp;
        value_rows[y] = w.values.data() + (t0 + y) * dp;
        if constexpr (bf16_dot<T, A>) {
          key_rows16[y] = w.keys16.data() + (t0 + y) * dp;
          value_rows16[y] = w.values16.data() + (t0 + y) * dp;
        }
        dk_rows[y] = w.dk.data() + (t0 + y) * dp;
        dv_rows[y] = w.dv.data() + (t0 + y) * dp;
      }
      with_rows<A>(count, [&](auto rows_now) {
        constexpr int R = decltype(rows_now)::value;
        if constexpr (bf16_dot<T, A>) {
          if (dot16) {
            bf16::score_tile<R>(key_rows16, w.qT16.data(), dp, w.s.data());
            bf16::score_tile<R>(value_rows16, w.doutT16.data(), dp, w.ds.data());
          }
        }
        if (!dot16) {
          score_tile<R>(key_rows, w.qT.data(), dp, w.s.data());        // Sᵀ[t][row]
          score_tile<R>(value_rows, w.doutT.data(), dp, w.ds.data());  // dPᵀ[t][row]
        }
        for (int y = 0; y < R; ++y) {
          const batch key_pos(static_cast<A>(t0 + y));
          for (std::int64_t c = 0; c < chunk; c += tile::width)
            softmax_grad<A>(w.s.data() + y * chunk + c, w.ds.data() + y * chunk + c, scale,
                                   batch::load_aligned(w.chunk_lse.data() + c), batch::load_aligned(w.chunk_delta.data() + c),
                                   key_pos <= batch::load_aligned(w.chunk_pos.data() + c));
        }
        if constexpr (bf16_dot<T, A>) {
          if (dot16) {  // P and dS rounded to bf16; an odd m's partner row is zero with P = dS = 0
            bf16::value_tile<R>(w.s.data(), w.dout_value16.data(), m, dp, dv_rows);
            bf16::value_tile<R>(w.ds.data(), w.q_value16.data(), m, dp, dk_rows);
          }
        }
        if (!dot16) {
          value_tile<R>(w.s.data(), w.dout.data(), m, dp, dv_rows);  // dv_t += Σ_row P · dout
          value_tile<R>(w.ds.data(), w.q.data(), m, dp, dk_rows);    // dk_t += Σ_row dS · q
        }
      });
    }
  }
  const A s = static_cast<A>(p.softmax_scale);
  for (std::int64_t t = 0; t < keys; ++t) {
    A* dk = w.dk.data() + t * dp;
    for (std::int64_t x = 0; x < d; ++x) dk[x] *= s;
    narrow_row<T>(dk, &p.dk(seq.batch, seq.k_start + b + t, kv, 0), d);
    narrow_row<T>(w.dv.data() + t * dp, &p.dv(seq.batch, seq.k_start + b + t, kv, 0), d);
  }
}

/// Query pass: dq of query tokens [i0, i1) of `seq`, every query head of kv head kv.
template <class T, class A>
void query_tile_grad(const core::bwd_params<T>& p, const tensor_view<const std::int32_t, 4>& sel, const A* delta,
                     const sequence_info& seq, std::int64_t kv, std::int64_t i0, std::int64_t i1,
                     backward_workspace<A>& w) {
  using tile = register_tile<A>;
  using batch = typename tile::batch;
  constexpr std::int64_t chunk = tile::chunk_keys;
  const std::int64_t group = p.q_heads / p.kv_heads, d = p.head_dim, dp = padded_dim<A>(d);
  const std::int64_t rows = (i1 - i0) * group, block = p.block_size;
  const std::int64_t last_block = core::current_block(seq.pos(i1 - 1), block);
  grow(w.q, rows * dp);
  grow(w.dout, rows * dp);
  grow(w.dq, rows * dp);
  grow(w.lse, rows);
  grow(w.delta, rows);
  grow(w.pos, rows);
  grow(w.block_start, last_block + 2);
  grow(w.kT, dp * chunk);
  grow(w.vT, dp * chunk);
  grow(w.k_chunk, chunk * dp);
  grow(w.value_row, dp);
  grow(w.s, tile::rows * chunk);
  grow(w.ds, tile::rows * chunk);
  grow(w.chunk_rows, std::max(rows, last_block + 1));
  bool tile_dot16 = false;  // bf16 dot products, unless a query or output gradient is too small for them
  if constexpr (bf16_dot<T, A>) {
    grow(w.q16, rows * dp);
    grow(w.dout16, rows * dp);
    grow(w.k16, dp * chunk);
    grow(w.v16, dp * chunk);
    grow(w.k_value16, chunk * dp);
    tile_dot16 = true;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t h = kv * group + r % group, t = seq.q_start + i0 + r / group;
      const bool tiny_q = bf16::copy_bits(&p.q(seq.batch, t, h, 0), d, dp, w.q16.data() + r * dp);
      const bool tiny_dout = bf16::copy_bits(&p.dout(seq.batch, t, h, 0), d, dp, w.dout16.data() + r * dp);
      tile_dot16 = tile_dot16 && !tiny_q && !tiny_dout;
    }
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t i = i0 + r / group, h = kv * group + r % group, t = seq.q_start + i;
    widen_row<A>(&p.q(seq.batch, t, h, 0), w.q.data() + r * dp, d, dp);
    widen_row<A>(&p.dout(seq.batch, t, h, 0), w.dout.data() + r * dp, d, dp);
    std::fill_n(w.dq.data() + r * dp, dp, A(0));
    w.lse[r] = static_cast<A>(p.lse(seq.batch, t, h));
    w.delta[r] = delta[(seq.batch * p.q.extent[1] + t) * p.q_heads + h];
    w.pos[r] = seq.pos(i);
  }
  // Rows grouped by block (counting sort, rows ascending within a block), as in the forward.
  std::fill_n(w.block_start.data(), last_block + 2, 0);
  auto each_row_block = [&](auto&& f) {
    for (std::int64_t r = 0; r < rows; ++r)
      for_each_selected(p, sel, seq, i0 + r / group, kv * group + r % group, [&](std::int64_t j) { f(r, j); });
  };
  each_row_block([&](std::int64_t, std::int64_t j) { ++w.block_start[j + 1]; });
  for (std::int64_t j = 0; j <= last_block; ++j) w.block_start[j + 1] += w.block_start[j];
  grow(w.block_rows, w.block_start[last_block + 1]);
  std::copy_n(w.block_start.data(), last_block + 1, w.chunk_rows.data());  // per-block cursors
  each_row_block([&](std::int64_t r, std::int64_t j) { w.block_rows[w.chunk_rows[j]++] = r; });

  const batch scale(static_cast<A>(p.softmax_scale));
  alignas(sizeof(batch)) A lane[tile::width];
  for (int x = 0; x < tile::width; ++x) lane[x] = static_cast<A>(x);
  const batch iota = batch::load_aligned(lane);
  const A* rows_q[tile::rows];
  const A* rows_dout[tile::rows];
  const std::uint16_t* rows_q16[tile::rows];
  const std::uint16_t* rows_dout16[tile::rows];
  A* rows_dq[tile::rows];
  for (std::int64_t j = 0; j <= last_block; ++j) {
    const std::int64_t first = w.block_start[j], last = w.block_start[j + 1];
    if (first == last) continue;
    const std::int64_t end = std::min(core::block_end(j, block, seq.k_len), w.pos[w.block_rows[last - 1]] + 1);
    for (std::int64_t t0 = core::block_begin(j, block); t0 < end; t0 += chunk) {
      const std::int64_t keys = std::min(chunk, end - t0);
      bool dot16 = tile_dot16;
      if constexpr (bf16_dot<T, A>) {
        for (std::int64_t t = 0; t < keys && dot16; ++t)
          dot16 = !bf16::has_tiny(&p.k(seq.batch, seq.k_start + t0 + t, kv, 0), d) &&
                  !bf16::has_tiny(&p.v(seq.batch, seq.k_start + t0 + t, kv, 0), d);
        if (dot16) {
          if (keys < chunk || dp > d)
            for (auto* packed : {&w.k16, &w.v16, &w.k_value16}) std::fill_n(packed->data(), dp * chunk, std::uint16_t{0});
          for (std::int64_t t = 0; t < keys; ++t) {
            const T* key = &p.k(seq.batch, seq.k_start + t0 + t, kv, 0);
            bf16::pack_key(key, t, d, w.k16.data());
            bf16::pack_key(&p.v(seq.batch, seq.k_start + t0 + t, kv, 0), t, d, w.v16.data());
            bf16::pack_value(key, t, d, dp, w.k_value16.data());
          }
        }
      }
      if (!dot16 && (keys < chunk || dp > d)) {
        std::fill_n(w.kT.data(), dp * chunk, A(0));
        std::fill_n(w.vT.data(), dp * chunk, A(0));
      }
      for (std::int64_t t = 0; t < keys && !dot16; ++t) {
        A* key = w.k_chunk.data() + t * dp;
        widen_row<A>(&p.k(seq.batch, seq.k_start + t0 + t, kv, 0), key, d, dp);
        for (std::int64_t x = 0; x < d; ++x) w.kT[x * chunk + t] = key[x];
        widen_row<A>(&p.v(seq.batch, seq.k_start + t0 + t, kv, 0), w.value_row.data(), d, d);
        for (std::int64_t x = 0; x < d; ++x) w.vT[x * chunk + t] = w.value_row[x];
      }
      std::int64_t n = 0;
      for (std::int64_t x = first; x < last; ++x)
        if (w.pos[w.block_rows[x]] >= t0) w.chunk_rows[n++] = w.block_rows[x];
      for (std::int64_t x = 0; x < n; x += tile::rows) {
        const std::int64_t count = std::min<std::int64_t>(tile::rows, n - x);
        for (std::int64_t y = 0; y < count; ++y) {
          rows_q[y] = w.q.data() + w.chunk_rows[x + y] * dp;
          rows_dout[y] = w.dout.data() + w.chunk_rows[x + y] * dp;
          rows_dq[y] = w.dq.data() + w.chunk_rows[x + y] * dp;
          if constexpr (bf16_dot<T, A>) {
            rows_q16[y] = w.q16.data() + w.chunk_rows[x + y] * dp;
            rows_dout16[y] = w.dout16.data() + w.chunk_rows[x + y] * dp;
          }
        }
        with_rows<A>(count, [&](auto rows_now) {
          constexpr int R = decltype(rows_now)::value;
          if constexpr (bf16_dot<T, A>) {
            if (dot16) {
              bf16::score_tile<R>(rows_q16, w.k16.data(), dp, w.s.data());
              bf16::score_tile<R>(rows_dout16, w.v16.data(), dp, w.ds.data());
            }
          }
          if (!dot16) {
            score_tile<R>(rows_q, w.kT.data(), dp, w.s.data());
            score_tile<R>(rows_dout, w.vT.data(), dp, w.ds.data());
          }
          std::int64_t valid[tile::rows], common = keys;
          for (int y = 0; y < R; ++y) {
            const std::int64_t r = w.chunk_rows[x + y];
            valid[y] = std::min(keys, w.pos[r] - t0 + 1);
            common = std::min(common, valid[y]);
            const batch limit(static_cast<A>(valid[y])), lse(w.lse[r]), delta_r(w.delta[r]);
            for (std::int64_t c = 0; c < chunk; c += tile::width)
              softmax_grad<A>(w.s.data() + y * chunk + c, w.ds.data() + y * chunk + c, scale, lse, delta_r,
                                     iota + batch(static_cast<A>(c)) < limit);
          }
          // dq += dS · k over the keys every row attends, then each row's own tail (as the forward;
          // bf16 keys go in pairs, so where `common` is odd its partner may lie past a row's position).
          if constexpr (bf16_dot<T, A>) {
            if (dot16) {
              const std::int64_t both = common == keys ? keys : common & ~std::int64_t{1};
              bf16::value_tile<R>(w.ds.data(), w.k_value16.data(), both, dp, rows_dq);
              for (int y = 0; y < R; ++y)
                value_tail(w.ds.data() + y * chunk, both, valid[y], d, rows_dq[y],
                           [&](std::int64_t t) { return &p.k(seq.batch, seq.k_start + t0 + t, kv, 0); });
            }
          }
          if (!dot16) {
            value_tile<R>(w.ds.data(), w.k_chunk.data(), common, dp, rows_dq);
            for (int y = 0; y < R; ++y)
              value_tail(w.ds.data() + y * chunk, common, valid[y], d, rows_dq[y],
                         [&](std::int64_t t) { return w.k_chunk.data() + t * dp; });
          }
        });
      }
    }
  }
  const A s = static_cast<A>(p.softmax_scale);
  for (std::int64_t r = 0; r < rows; ++r) {
    A* dq = w.dq.data() + r * dp;
    for (std::int64_t x = 0; x < d; ++x) dq[x] *= s;
    narrow_row<T>(dq, &p.dq(seq.batch, seq.q_start + i0 + r / group, kv * group + r % group, 0), d);
  }
}

/// The backward pass. `sel` is the selection held fixed: the caller's, or the forward gate's
/// recomputed into the state by the backend (empty in full mode: every block up to the current one).
template <class T, class A>
void backward(const core::bwd_params<T>& p, const tensor_view<const std::int32_t, 4>& sel, backward_state<A>& state) {
  const std::int64_t group = p.q_heads / p.kv_heads, block = p.block_size;
  // δ = rowsum(dout ∘ out), per (token, query head), summed in A in dim order.
  const std::int64_t tokens = p.q.extent[0] * p.q.extent[1];
  state.delta.resize(tokens * p.q_heads);
  parallel_for_each((tokens + 255) / 256, [&](std::int64_t x) {
    for (std::int64_t t = x * 256; t < std::min(tokens, (x + 1) * 256); ++t)
      for (std::int64_t h = 0; h < p.q_heads; ++h) {
        A sum(0);
        for (std::int64_t e = 0; e < p.head_dim; ++e)
          sum += static_cast<A>(to_double(p.dout(t / p.q.extent[1], t % p.q.extent[1], h, e))) *
                 static_cast<A>(to_double(p.out(t / p.q.extent[1], t % p.q.extent[1], h, e)));
        state.delta[t * p.q_heads + h] = sum;
      }
  });

  // Which rows selected each block, per (sequence, kv head); in full mode a block's rows are every
  // row from the block's first position on, so nothing is stored.
  block_rows_index& index = state.index;
  const std::int64_t pairs = p.seqs.count * p.kv_heads;
  index.start.assign(pairs + 1, 0);
  std::vector<std::int64_t>& rows_start = state.rows_start;
  rows_start.assign(pairs + 1, 0);
  for (std::int64_t s = 0; s < p.seqs.count; ++s)
    for (std::int64_t kv = 0; kv < p.kv_heads; ++kv) {
      const std::int64_t x = s * p.kv_heads + kv;
      const sequence_info seq = p.seqs[s];
      index.start[x + 1] = index.start[x] + core::block_count(seq.k_len, block) + 1;
      rows_start[x + 1] = rows_start[x] + (sel.given() ? seq.q_len * group * sel.extent[3] : 0);
    }
  index.bounds.assign(index.start.back(), 0);
  index.rows.resize(rows_start.back());
  if (sel.given()) parallel_for_each(pairs, [&](std::int64_t x) {
    const sequence_info seq = p.seqs[x / p.kv_heads];
    const std::int64_t kv = x % p.kv_heads;
    std::int64_t* bounds = index.bounds.data() + index.start[x];
    const std::int64_t blocks = core::block_count(seq.k_len, block);
    auto each = [&](auto&& f) {
      for (std::int64_t i = 0; i < seq.q_len; ++i)
        for (std::int64_t g = 0; g < group; ++g)
          for_each_selected(p, sel, seq, i, kv * group + g, [&](std::int64_t j) { f(i * group + g, j); });
    };
    // Counting sort: bounds[j + 1] counts block j's rows, then fills it (each block's end moves
    // up to the next block's start), then every bound is shifted to the pair's rows.
    each([&](std::int64_t, std::int64_t j) { ++bounds[j + 1]; });
    for (std::int64_t j = 0; j < blocks; ++j) bounds[j + 1] += bounds[j];
    std::int64_t* rows = index.rows.data() + rows_start[x];
    for (std::int64_t j = blocks; j > 0; --j) bounds[j] = bounds[j - 1];  // bounds[j + 1]: block j's cursor
    each([&](std::int64_t r, std::int64_t j) { rows[bounds[j + 1]++] = r; });
    for (std::int64_t j = 0; j <= blocks; ++j) bounds[j] += rows_start[x];
  });

  // Work items: key blocks, and query tiles as in the forward; costliest first. Each item's sums are
  // its own, so the gradients do not depend on which thread runs what.
  auto full_first_row = [&](const sequence_info& seq, std::int64_t j) {
    return std::max<std::int64_t>(0, core::block_begin(j, block) - (seq.k_len - seq.q_len)) * group;
  };
  state.key_items.clear();
  state.query_items.clear();
  const std::int64_t tile = query_tile_tokens(block, group);
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    for (std::int64_t kv = 0; kv < p.kv_heads; ++kv)
      for (std::int64_t j = 0; j < core::block_count(seq.k_len, block); ++j) {
        const std::int64_t* bounds = index.bounds.data() + index.start[s * p.kv_heads + kv];
        const std::int64_t n = sel.given() ? bounds[j + 1] - bounds[j] : seq.q_len * group - full_first_row(seq, j);
        state.key_items.push_back({s, kv, j, n});
      }
    for (std::int64_t i0 = 0; i0 < seq.q_len;) {
      const std::int64_t i1 = std::min(seq.q_len, (seq.pos(i0) / tile + 1) * tile - (seq.k_len - seq.q_len));
      const double cost = static_cast<double>(i1 - i0) *
                          static_cast<double>(core::attended_keys(seq.pos((i0 + i1) / 2), block, p.top_k, p.full));
      for (std::int64_t kv = 0; kv < p.kv_heads; ++kv) state.query_items.push_back({s, kv, i0, i1, cost});
      i0 = i1;
    }
  }
  std::sort(state.key_items.begin(), state.key_items.end(),
            [](const key_block_item& a, const key_block_item& b) { return a.rows > b.rows; });
  std::sort(state.query_items.begin(), state.query_items.end(),
            [](const work_item& a, const work_item& b) { return a.cost > b.cost; });
  const A* delta = state.delta.data();
  parallel_for_each(static_cast<std::int64_t>(state.key_items.size()), [&](std::int64_t x) {
    const key_block_item& item = state.key_items[x];
    const sequence_info seq = p.seqs[item.seq];
    backward_workspace<A>& w = state.scratch.local();
    if (sel.given()) {
      const std::int64_t* rows = index.rows.data() + index.bounds[index.start[item.seq * p.kv_heads + item.kv] + item.block];
      key_block_grad<T, A>(p, delta, seq, item.kv, item.block, item.rows, [rows](std::int64_t y) { return rows[y]; }, w);
    } else {
      const std::int64_t first = full_first_row(seq, item.block);
      key_block_grad<T, A>(p, delta, seq, item.kv, item.block, item.rows, [first](std::int64_t y) { return first + y; }, w);
    }
  });
  parallel_for_each(static_cast<std::int64_t>(state.query_items.size()), [&](std::int64_t x) {
    const work_item& item = state.query_items[x];
    query_tile_grad<T, A>(p, sel, delta, p.seqs[item.seq], item.kv, item.i0, item.i1, state.scratch.local());
  });
}

}  // namespace moba::backends::cpu
