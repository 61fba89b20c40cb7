// SPDX-License-Identifier: MIT
/// @file The CPU forward kernel for one work item: a query tile of one kv-head group of one sequence.
/// Gates each row, groups the rows by the key blocks they selected, and for every key chunk runs
/// two register-tiled matrix products with an online softmax in between (flash-attention style).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <xsimd/xsimd.hpp>

#include <moba/backends/cpu/dot_bf16.hpp>
#include <moba/backends/cpu/pack.hpp>
#include <moba/backends/cpu/simd.hpp>
#include <moba/backends/cpu/tiling.hpp>
#include <moba/backends/cpu/workspace.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>

namespace moba::backends::cpu {

/// S[r][0, chunk_keys) = q_r · kT[:, 0, chunk_keys) for `Rows` rows: the scores of one key chunk.
template <int Rows, class A>
void score_tile(const A* const* q, const A* kT, std::int64_t dp, A* s) {
  using tile = register_tile<A>;
  using batch = typename tile::batch;
  batch acc[Rows][tile::vectors];
  for (auto& row : acc)
    for (auto& a : row) a = batch(A(0));
  for (std::int64_t d = 0; d < dp; ++d) {
    batch k[tile::vectors];
    for (int v = 0; v < tile::vectors; ++v) {
      k[v] = batch::load_aligned(kT + d * tile::chunk_keys + v * tile::width);
      keep_in_register(k[v]);
    }
    for (int r = 0; r < Rows; ++r) {
      const batch qd(q[r][d]);
      for (int v = 0; v < tile::vectors; ++v) acc[r][v] = xsimd::fma(qd, k[v], acc[r][v]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < tile::vectors; ++v) acc[r][v].store_aligned(s + r * tile::chunk_keys + v * tile::width);
}

/// o_r += Σ_t p[r][t] · v[t] for `Rows` rows over `keys` keys; vectors of the output columns in
/// passes of `Vectors` (the register tile), then single vectors for the rest of Dp.
template <int Rows, int Vectors, class A>
std::int64_t accumulate_pass(const A* p, const A* v, std::int64_t keys, std::int64_t dp, A* const* o,
                             std::int64_t col) {
  using tile = register_tile<A>;
  using batch = typename tile::batch;
  for (; col + Vectors * tile::width <= dp; col += Vectors * tile::width) {
    batch acc[Rows][Vectors];
    for (int r = 0; r < Rows; ++r)
      for (int x = 0; x < Vectors; ++x) acc[r][x] = batch::load_aligned(o[r] + col + x * tile::width);
    for (std::int64_t t = 0; t < keys; ++t) {
      batch vt[Vectors];
      for (int x = 0; x < Vectors; ++x) {
        vt[x] = batch::load_aligned(v + t * dp + col + x * tile::width);
        keep_in_register(vt[x]);
      }
      for (int r = 0; r < Rows; ++r) {
        const batch pt(p[r * tile::chunk_keys + t]);
        for (int x = 0; x < Vectors; ++x) acc[r][x] = xsimd::fma(pt, vt[x], acc[r][x]);
      }
    }
    for (int r = 0; r < Rows; ++r)
      for (int x = 0; x < Vectors; ++x) acc[r][x].store_aligned(o[r] + col + x * tile::width);
  }
  return col;
}

template <int Rows, class A>
void value_tile(const A* p, const A* v, std::int64_t keys, std::int64_t dp, A* const* o) {
  const std::int64_t col = accumulate_pass<Rows, register_tile<A>::vectors>(p, v, keys, dp, o, 0);
  accumulate_pass<Rows, 1>(p, v, keys, dp, o, col);
}

/// Online softmax over one chunk for one row: masks keys at or past `valid`, turns scores into
/// probabilities relative to the new running max, and rescales the row's running state. The running
/// sum is kept per SIMD lane (`l`, one vector) and added across lanes once, at the end of the row.
template <class A>
void softmax_chunk(A* s, std::int64_t valid, A scale, A& m, A* l, A* o, std::int64_t dp) {
  using tile = register_tile<A>;
  using batch = typename tile::batch;
  const batch neg_inf(-std::numeric_limits<A>::infinity());
  batch scores[tile::vectors], top = neg_inf;
  for (int v = 0; v < tile::vectors; ++v) scores[v] = batch::load_aligned(s + v * tile::width) * batch(scale);
  if (valid < tile::chunk_keys) {
    alignas(sizeof(batch)) A lane[tile::width];
    for (int x = 0; x < tile::width; ++x) lane[x] = static_cast<A>(x);
    const batch iota = batch::load_aligned(lane), limit(static_cast<A>(valid));
    for (int v = 0; v < tile::vectors; ++v)
      scores[v] = xsimd::select(iota + batch(static_cast<A>(v * tile::width)) < limit, scores[v], neg_inf);
  }
  for (int v = 0; v < tile::vectors; ++v) top = xsimd::max(top, scores[v]);
  // Past the first chunks the running max rarely moves: skip the horizontal max when it does not.
  A new_max = m;
  if (!xsimd::all(top <= batch(m))) {
    alignas(sizeof(batch)) A lane[tile::width];
    top.store_aligned(lane);
    A chunk_max = lane[0];
    for (int x = 1; x < tile::width; ++x) chunk_max = std::max(chunk_max, lane[x]);
    new_max = std::max(m, chunk_max);
  }
  batch sum(A(0));
  for (int v = 0; v < tile::vectors; ++v) {
    const batch e = xsimd::exp(scores[v] - batch(new_max));
    e.store_aligned(s + v * tile::width);
    sum += e;
  }
  const A alpha = new_max == m ? A(1) : std::exp(m - new_max);  // 0 on the first chunk (m = -inf)
  m = new_max;
  if (alpha != A(1)) {
    const batch a(alpha);
    sum = xsimd::fma(batch::load_aligned(l), a, sum);
    for (std::int64_t c = 0; c < dp; c += tile::width) (batch::load_aligned(o + c) * a).store_aligned(o + c);
  } else {
    sum += batch::load_aligned(l);
  }
  sum.store_aligned(l);
}

/// Runs `f(std::integral_constant<int, R>)` for R = `rows` (1 ... register_tile rows).
template <class A, class F>
void with_rows(std::int64_t rows, F&& f) {
  static_assert(register_tile<A>::rows == 4 || register_tile<A>::rows == 2);
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: if constexpr (register_tile<A>::rows == 4) return f(std::integral_constant<int, 3>{});
      break;
    case 4: if constexpr (register_tile<A>::rows == 4) return f(std::integral_constant<int, 4>{});
      break;
  }
}

/// o[0, d) += Σ_{t ∈ [from, to)} p[t] · v_t for one row, v_t = row(t) widened: the keys of a chunk this
/// row attends beyond those every row of its register tile attends (its own position's chunk). Adding
/// them to the row alone means a key past a row's position never meets it, whatever it holds
/// (0·inf = NaN).
template <class A, class Row>
void value_tail(const A* p, std::int64_t from, std::int64_t to, std::int64_t d, A* o, Row&& row) {
  for (std::int64_t t = from; t < to; ++t) {
    const auto* v = row(t);
    const A pt = p[t];
    for (std::int64_t x = 0; x < d; ++x) {
      if constexpr (std::is_same_v<std::remove_cvref_t<decltype(*v)>, bfloat16>) {
        o[x] += pt * detail::bits_float(std::uint32_t{v[x].bits} << 16);  // vectorises as a shift
      } else {
        o[x] += pt * v[x];
      }
    }
  }
}

/// One work item: query tokens [i0, i1) of sequence `seq`, every query head of kv head `kv`.
/// `means` holds the sequence's key-block means for this kv head, [blocks, Dp] in the compute type
/// (null when the caller gives the selection). With p.gate_only it writes the selection and stops.
template <class T, class A>
void run_tile(const core::fwd_params<T>& p, const sequence_info& seq, std::int64_t kv, std::int64_t i0,
              std::int64_t i1, const A* means, tile_workspace<A>& w) {
  using tile = register_tile<A>;
  constexpr A neg_inf = -std::numeric_limits<A>::infinity();
  const std::int64_t group = p.q_heads / p.kv_heads, d = p.head_dim, dp = padded_dim<A>(d);
  const std::int64_t rows = (i1 - i0) * group, block = p.block_size;
  const bool attend = !p.gate_only, given = p.selection.given();
  // Selection entries per row: at most the blocks up to the tile's last current block, never top_k
  // itself (top_k >= blocks means dense, and may be 2^62).
  const std::int64_t last_block = core::current_block(seq.pos(i1 - 1), block);
  const std::int64_t width = given ? std::min(p.selection.extent[3], last_block + 1)
                                   : core::history_count(last_block, p.top_k, p.full) + 1;

  grow(w.q, rows * dp);
  grow(w.pos, rows);
  grow(w.selection, rows * width);
  grow(w.count, rows);
  grow(w.score_scratch, width);
  if (attend) {
    grow(w.o, rows * dp);
    grow(w.m, rows);
    grow(w.l, rows * tile::width);
    grow(w.chunk_rows, std::max(rows, last_block + 1));
    grow(w.k_packed, dp * tile::chunk_keys);
    grow(w.v_chunk, tile::chunk_keys * dp);
    grow(w.scores, tile::rows * tile::chunk_keys);
    if constexpr (bf16_dot<T, A>) {
      grow(w.q16, rows * dp);
      grow(w.k16, dp * tile::chunk_keys);
      grow(w.v16, dp * tile::chunk_keys);
    }
  }

  // Rows are (token, head) pairs, token-major: row r is token i0 + r / group, head kv*group + r % group.
  bool tiny_q = false;  // a query too small for vdpbf16ps (dot_bf16.hpp): the tile runs on fp32
  constexpr std::int64_t ahead = 8;  // rows fetched ahead: each lies in a page of its own (prefetch)
  auto query_row = [&](std::int64_t r) { return &p.q(seq.batch, seq.q_start + i0 + r / group, kv * group + r % group, 0); };
  for (std::int64_t r = 0; r < std::min(rows, ahead); ++r) prefetch(query_row(r), d * static_cast<std::int64_t>(sizeof(T)));
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t i = i0 + r / group, h = kv * group + r % group;
    if (r + ahead < rows) prefetch(query_row(r + ahead), d * static_cast<std::int64_t>(sizeof(T)));
    widen_row<A>(&p.q(seq.batch, seq.q_start + i, h, 0), w.q.data() + r * dp, d, dp);
    w.pos[r] = seq.pos(i);
    if (!attend) continue;
    if constexpr (bf16_dot<T, A>) {
      tiny_q = bf16::copy_bits(&p.q(seq.batch, seq.q_start + i, h, 0), d, dp, w.q16.data() + r * dp) || tiny_q;
    }
    std::fill_n(w.o.data() + r * dp, dp, A(0));
    w.m[r] = neg_inf;
    std::fill_n(w.l.data() + r * tile::width, tile::width, A(0));
  }

  // Selection (SPEC §Blocks): the caller's (§Blocks 7, checked before the call), or the gate's top
  // (K−1) past blocks by q·kbar plus the current block, ascending.
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t c = core::current_block(w.pos[r], block);
    std::int64_t* sel = w.selection.data() + r * width;
    if (given) {
      const std::int64_t t = seq.q_start + i0 + r / group, h = kv * group + r % group;
      std::int64_t n = 0;
      for (; n < width && p.selection(seq.batch, t, h, n) >= 0; ++n) sel[n] = p.selection(seq.batch, t, h, n);
      w.count[r] = n;
      continue;
    }
    const std::int64_t want = core::history_count(c, p.top_k, p.full);
    if (p.full) {
      for (std::int64_t j = 0; j < c; ++j) sel[j] = j;
    } else {
      core::top_n<A> best{sel, w.score_scratch.data(), want};
      const A* q = w.q.data() + r * dp;
      for (std::int64_t j = 0; j < c; ++j) {
        xsimd::batch<A> acc(A(0));
        for (std::int64_t x = 0; x < dp; x += tile::width)
          acc = xsimd::fma(xsimd::batch<A>::load_aligned(q + x), xsimd::batch<A>::load_aligned(means + j * dp + x), acc);
        best.offer(xsimd::hadd(acc), j);
      }
      core::sort_ascending(sel, want);
    }
    sel[want] = c;
    w.count[r] = want + 1;
  }
  auto write_selected = [&](std::int64_t r, std::int64_t t, std::int64_t h) {
    for (std::int64_t x = 0; x < p.selected.extent[3]; ++x)
      p.selected(seq.batch, t, h, x) = x < w.count[r] ? static_cast<std::int32_t>(w.selection[r * width + x]) : -1;
  };
  if (!attend) {
    if (p.selected.given())
      for (std::int64_t r = 0; r < rows; ++r) write_selected(r, seq.q_start + i0 + r / group, kv * group + r % group);
    return;
  }

  // Group rows by block (counting sort): block j's rows are block_rows[block_start[j], block_start[j+1]).
  grow(w.block_start, last_block + 2);
  std::fill_n(w.block_start.data(), last_block + 2, 0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t x = 0; x < w.count[r]; ++x) ++w.block_start[w.selection[r * width + x] + 1];
  for (std::int64_t j = 0; j <= last_block; ++j) w.block_start[j + 1] += w.block_start[j];
  grow(w.block_rows, w.block_start[last_block + 1]);
  {
    std::int64_t* fill = w.chunk_rows.data();  // reused as per-block cursors
    std::copy_n(w.block_start.data(), last_block + 1, fill);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t x = 0; x < w.count[r]; ++x) w.block_rows[fill[w.selection[r * width + x]]++] = r;
  }

  const A scale = static_cast<A>(p.softmax_scale);
  const A* rows_q[tile::rows];
  const std::uint16_t* rows_q16[tile::rows];
  A* rows_o[tile::rows];
  auto selected_by_some = [&](std::int64_t j) { return w.block_start[j] < w.block_start[j + 1]; };
  // The keys and values of chunk [t0, t0 + chunk_keys) are fetched while the chunk before is computed.
  auto prefetch_chunk = [&](std::int64_t t0, std::int64_t end) {
    for (std::int64_t t = t0; t < std::min<std::int64_t>(end, t0 + tile::chunk_keys); ++t) {
      prefetch(&p.k(seq.batch, seq.k_start + t, kv, 0), d * static_cast<std::int64_t>(sizeof(T)));
      prefetch(&p.v(seq.batch, seq.k_start + t, kv, 0), d * static_cast<std::int64_t>(sizeof(T)));
    }
  };
  for (std::int64_t j = 0; j <= last_block; ++j)
    if (selected_by_some(j)) {
      prefetch_chunk(core::block_begin(j, block), core::block_end(j, block, seq.k_len));
      break;
    }
  for (std::int64_t j = 0; j <= last_block; ++j) {
    const std::int64_t first = w.block_start[j], last = w.block_start[j + 1];
    if (first == last) continue;
    const std::int64_t end = std::min(core::block_end(j, block, seq.k_len), w.pos[w.block_rows[last - 1]] + 1);
    std::int64_t next_j = j + 1;
    while (next_j <= last_block && !selected_by_some(next_j)) ++next_j;
    for (std::int64_t t0 = core::block_begin(j, block); t0 < end; t0 += tile::chunk_keys) {
      const std::int64_t keys = std::min<std::int64_t>(tile::chunk_keys, end - t0);
      if (t0 + tile::chunk_keys < end) {
        prefetch_chunk(t0 + tile::chunk_keys, end);
      } else if (next_j <= last_block) {
        prefetch_chunk(core::block_begin(next_j, block), core::block_end(next_j, block, seq.k_len));
      }
      // Pack the chunk: keys transposed to [Dp, chunk] and values to [chunk, Dp] (bf16 dot products:
      // the pair layouts of dot_bf16.hpp), zeros past the chunk's keys and D. Values are copied even
      // when no widening is needed: rows H·D apart in the caller's tensor alias the same L1 sets and
      // measured slower in place. bf16 chunks holding values too small for vdpbf16ps run on the fp32
      // products.
      auto key_row = [&](std::int64_t t) { return &p.k(seq.batch, seq.k_start + t0 + t, kv, 0); };
      auto value_row = [&](std::int64_t t) { return &p.v(seq.batch, seq.k_start + t0 + t, kv, 0); };
      bool dot16 = false;
      if constexpr (bf16_dot<T, A>) {
        dot16 = !tiny_q && !bf16::pack_transposed(key_row, keys, d, dp, w.k16.data());
        dot16 = dot16 && !bf16::pack_paired(value_row, keys, d, dp, w.v16.data());
      }
      if (!dot16) {
        pack_transposed<A, T>(key_row, keys, d, dp, w.k_packed.data());
        for (std::int64_t t = 0; t < keys; ++t) widen_row<A>(value_row(t), w.v_chunk.data() + t * dp, d, dp);
      }
      // Rows that see at least one key of this chunk (a current-block row stops at its own position).
      std::int64_t n = 0;
      for (std::int64_t x = first; x < last; ++x) {
        const std::int64_t r = w.block_rows[x];
        if (w.pos[r] >= t0) w.chunk_rows[n++] = r;
      }
      for (std::int64_t x = 0; x < n; x += tile::rows) {
        const std::int64_t count = std::min<std::int64_t>(tile::rows, n - x);
        // The next register tile's rows are scattered over the work item's (larger than L2): fetch them.
        for (std::int64_t y = x + tile::rows; y < std::min(n, x + 2 * tile::rows); ++y) {
          const std::int64_t row = w.chunk_rows[y];
          if constexpr (bf16_dot<T, A>) {
            if (dot16) prefetch(w.q16.data() + row * dp, dp * 2);
          }
          if (!dot16) prefetch(w.q.data() + row * dp, dp * static_cast<std::int64_t>(sizeof(A)));
          prefetch(w.o.data() + row * dp, dp * static_cast<std::int64_t>(sizeof(A)));
        }
        for (std::int64_t y = 0; y < count; ++y) {
          rows_q[y] = w.q.data() + w.chunk_rows[x + y] * dp;
          if constexpr (bf16_dot<T, A>) rows_q16[y] = w.q16.data() + w.chunk_rows[x + y] * dp;
          rows_o[y] = w.o.data() + w.chunk_rows[x + y] * dp;
        }
        with_rows<A>(count, [&](auto r) {
          constexpr int rows_now = decltype(r)::value;
          if constexpr (bf16_dot<T, A>) {
            if (dot16) bf16::score_tile<rows_now>(rows_q16, w.k16.data(), dp, w.scores.data());
          }
          if (!dot16) score_tile<rows_now>(rows_q, w.k_packed.data(), dp, w.scores.data());
          // Each row's keys end at its own position; `common` keys are attended by every row of the tile.
          std::int64_t valid[tile::rows], common = keys;
          for (std::int64_t y = 0; y < count; ++y) {
            const std::int64_t row = w.chunk_rows[x + y];
            valid[y] = std::min(keys, w.pos[row] - t0 + 1);
            common = std::min(common, valid[y]);
            softmax_chunk(w.scores.data() + y * tile::chunk_keys, valid[y], scale, w.m[row], w.l.data() + row * tile::width, rows_o[y], dp);
          }
          if constexpr (bf16_dot<T, A>) {
            if (dot16) {
              // Keys go in pairs: where `common` is odd its partner may lie past some row's position.
              const std::int64_t both = common == keys ? keys : common & ~std::int64_t{1};
              bf16::value_tile<rows_now>(w.scores.data(), w.v16.data(), both, dp, rows_o);
              for (std::int64_t y = 0; y < count; ++y)
                value_tail(w.scores.data() + y * tile::chunk_keys, both, valid[y], d, rows_o[y],
                           value_row);
            }
          }
          if (!dot16) {
            value_tile<rows_now>(w.scores.data(), w.v_chunk.data(), common, dp, rows_o);
            for (std::int64_t y = 0; y < count; ++y)
              value_tail(w.scores.data() + y * tile::chunk_keys, common, valid[y], d, rows_o[y],
                         [&](std::int64_t t) { return w.v_chunk.data() + t * dp; });
          }
        });
      }
    }
  }

  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t t = seq.q_start + i0 + r / group, h = kv * group + r % group;
    const A l = xsimd::hadd(tile::batch::load_aligned(w.l.data() + r * tile::width));
    const A inv = A(1) / l;
    A* o = w.o.data() + r * dp;
    for (std::int64_t x = 0; x < d; ++x) o[x] *= inv;
    narrow_row<T>(o, &p.out(seq.batch, t, h, 0), d);
    if (p.lse.given()) p.lse(seq.batch, t, h) = static_cast<accum_t<T>>(w.m[r] + std::log(l));
    if (p.selected.given()) write_selected(r, t, h);
  }
}

}  // namespace moba::backends::cpu
