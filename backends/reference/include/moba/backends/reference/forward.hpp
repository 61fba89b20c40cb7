// SPDX-License-Identifier: MIT
/// @file moba::reference: SPEC.md taken literally (forward, backward, decode), in double precision, O(N²) memory per head.
/// It is the oracle for every other backend: clarity over speed.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <moba/attention.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>
#include <moba/error.hpp>

namespace moba::backends::reference {

using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Rows [start, start + len) of one head of a `[batch, seq, heads, dim]` view, widened exactly to double.
template <class T>
matrix head_rows(const view4<const T>& x, std::int64_t batch, std::int64_t start, std::int64_t len, std::int64_t head) {
  matrix m(len, x.extent[3]);
  for (std::int64_t t = 0; t < len; ++t)
    for (std::int64_t d = 0; d < x.extent[3]; ++d) m(t, d) = to_double(x(batch, start + t, head, d));
  return m;
}

/// Key-block means kbar_j (SPEC §Blocks 2): one row per block, divided by the block's actual count.
inline matrix block_means(const matrix& keys, std::int64_t block_size) {
  const std::int64_t k_len = keys.rows(), n = core::block_count(k_len, block_size);
  matrix means(n, keys.cols());
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t b = core::block_begin(j, block_size), e = core::block_end(j, block_size, k_len);
    means.row(j) = keys.middleRows(b, e - b).colwise().sum() / static_cast<double>(e - b);
  }
  return means;
}

/// Per query of one head, the blocks it attends, ascending.
using block_lists = std::vector<std::vector<std::int64_t>>;

/// S(i) of SPEC §Blocks 5, ascending: the current block plus the top history blocks by `scores`.
inline std::vector<std::int64_t> select_blocks(const double* scores, std::int64_t pos, std::int64_t block_size,
                                               std::int64_t top_k, bool full) {
  const std::int64_t c = core::current_block(pos, block_size), want = core::history_count(c, top_k, full);
  std::vector<std::int64_t> index(want + 1);
  std::vector<double> best(want);
  core::top_n<double> top{index.data(), best.data(), want};
  for (std::int64_t j = 0; j < c; ++j) top.offer(scores[j], j);
  index[want] = c;
  core::sort_ascending(index.data(), want + 1);
  return index;
}

/// The gate of one query head (SPEC §Blocks 3–5): `means` are the block representatives (§Blocks 2).
inline block_lists gate(const matrix& q, const matrix& means, std::int64_t q_len, std::int64_t k_len,
                        std::int64_t block_size, std::int64_t top_k, bool full) {
  const matrix scores = q * means.transpose();
  block_lists blocks;
  for (std::int64_t i = 0; i < q_len; ++i)
    blocks.push_back(select_blocks(scores.row(i).data(), k_len - q_len + i, block_size, top_k, full));
  return blocks;
}

/// A caller's selection (SPEC §Blocks 7, checked by detail::check_selection) of query head h of `seq`:
/// each query's entries up to the first -1.
template <class Params>
block_lists given_blocks(const Params& p, const sequence_info& seq, std::int64_t h) {
  block_lists blocks(seq.q_len);
  for (std::int64_t i = 0; i < seq.q_len; ++i)
    for (std::int64_t w = 0; w < p.selection.extent[3]; ++w) {
      const std::int32_t j = p.selection(seq.batch, seq.q_start + i, h, w);
      if (j < 0) break;
      blocks[i].push_back(j);
    }
  return blocks;
}

/// One query head of one sequence: the attention weights P `[q_len, k_len]` of each query over the
/// keys of its blocks (causal inside the current block), zero elsewhere, with their log-sum-exp.
struct head_attention {
  std::int64_t q_len, k_len, block_size;
  block_lists blocks;  // per query, ascending
  matrix weights;
  std::vector<double> lse;

  /// f(begin, end) for each range of keys query i attends: its blocks, cut at its position.
  template <class F>
  void for_each_range(std::int64_t i, F&& f) const {
    const std::int64_t pos = k_len - q_len + i;
    for (std::int64_t j : blocks[i]) f(core::block_begin(j, block_size), core::block_end(j, block_size, pos + 1));
  }

  /// P·V summed over each query's attended keys only. A key a query does not attend never meets it,
  /// whatever its value holds (SPEC §Non-finite inputs); the dense product would make 0·inf = NaN.
  matrix times(const matrix& v) const {
    matrix o = matrix::Zero(q_len, v.cols());
    for (std::int64_t i = 0; i < q_len; ++i)
      for_each_range(i, [&](std::int64_t b, std::int64_t e) {
        o.row(i) += weights.row(i).segment(b, e - b) * v.middleRows(b, e - b);
      });
    return o;
  }
};

/// The weights of each query over the keys of `blocks` (SPEC §Attention). Only attended logits are
/// read: a logit depends on its own query and key alone, so the others may hold anything.
inline head_attention attend(const matrix& q, const matrix& k, block_lists blocks, std::int64_t k_len,
                             std::int64_t block_size, double scale) {
  const std::int64_t q_len = q.rows();
  head_attention a{q_len, k_len, block_size, std::move(blocks), matrix::Zero(q_len, k_len), {}};
  const matrix logits = scale * (q * k.transpose());
  for (std::int64_t i = 0; i < q_len; ++i) {
    double max_logit = -std::numeric_limits<double>::infinity(), sum = 0;
    a.for_each_range(i, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t t = b; t < e; ++t) max_logit = std::max(max_logit, logits(i, t));
    });
    a.for_each_range(i, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t t = b; t < e; ++t) sum += a.weights(i, t) = std::exp(logits(i, t) - max_logit);
    });
    a.weights.row(i) /= sum;
    a.lse.push_back(max_logit + std::log(sum));
  }
  return a;
}

/// Writes one query's blocks to a `selected` view: ascending, then -1 to the view's width.
inline void write_selected(const tensor_view<std::int32_t, 4>& selected, std::int64_t batch, std::int64_t t,
                           std::int64_t h, const std::vector<std::int64_t>& blocks) {
  for (std::int64_t w = 0; w < selected.extent[3]; ++w)
    selected(batch, t, h, w) = w < static_cast<std::int64_t>(blocks.size()) ? static_cast<std::int32_t>(blocks[w]) : -1;
}

/// The forward pass of SPEC §Attention for every sequence and query head: the gate's blocks or the
/// caller's selection; with gate_only, the selection alone.
template <class T>
void forward(const core::fwd_params<T>& p) {
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    if (seq.q_len == 0) continue;
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t kv = p.kv_head(h);
      const matrix q = head_rows(p.q, seq.batch, seq.q_start, seq.q_len, h);
      const matrix k = head_rows(p.k, seq.batch, seq.k_start, seq.k_len, kv);
      block_lists blocks = p.selection.given()
                               ? given_blocks(p, seq, h)
                               : gate(q, block_means(k, p.block_size), seq.q_len, seq.k_len, p.block_size, p.top_k, p.full);
      if (p.selected.given())
        for (std::int64_t i = 0; i < seq.q_len; ++i) write_selected(p.selected, seq.batch, seq.q_start + i, h, blocks[i]);
      if (p.gate_only) continue;
      const head_attention a = attend(q, k, std::move(blocks), seq.k_len, p.block_size, p.softmax_scale);
      const matrix o = a.times(head_rows(p.v, seq.batch, seq.k_start, seq.k_len, kv));
      for (std::int64_t i = 0; i < seq.q_len; ++i) {
        const std::int64_t t = seq.q_start + i;
        for (std::int64_t d = 0; d < p.head_dim; ++d) p.out(seq.batch, t, h, d) = from_double<T>(o(i, d));
        if (p.lse.given()) p.lse(seq.batch, t, h) = static_cast<accum_t<T>>(a.lse[i]);
      }
    }
  }
}

/// The backward pass of SPEC §Backward. P and O are recomputed in double from q, k, v rather than
/// read back from the rounded forward outputs, so the gradients are those of the exact forward.
template <class T>
void backward(const core::bwd_params<T>& p) {
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    for (std::int64_t kv = 0; kv < p.kv_heads; ++kv) {
      const matrix k = head_rows(p.k, seq.batch, seq.k_start, seq.k_len, kv);
      const matrix v = head_rows(p.v, seq.batch, seq.k_start, seq.k_len, kv);
      const matrix means = block_means(k, p.block_size);
      matrix dk = matrix::Zero(seq.k_len, p.head_dim), dv = matrix::Zero(seq.k_len, p.head_dim);
      for (std::int64_t h = kv * (p.q_heads / p.kv_heads); h < (kv + 1) * (p.q_heads / p.kv_heads); ++h) {
        const matrix q = head_rows(p.q, seq.batch, seq.q_start, seq.q_len, h);
        const matrix dout = head_rows(p.dout, seq.batch, seq.q_start, seq.q_len, h);
        block_lists blocks = p.selection.given() ? given_blocks(p, seq, h)
                                                 : gate(q, means, seq.q_len, seq.k_len, p.block_size, p.top_k, p.full);
        const head_attention a = attend(q, k, std::move(blocks), seq.k_len, p.block_size, p.softmax_scale);
        const matrix o = a.times(v);
        matrix dq = matrix::Zero(seq.q_len, p.head_dim);
        // Over each query's attended keys only, like the forward: ds_t = p_t (dout_i · v_t − δ_i).
        for (std::int64_t i = 0; i < seq.q_len; ++i) {
          const double delta = dout.row(i).dot(o.row(i));  // δ_i = dout_i · o_i
          a.for_each_range(i, [&](std::int64_t b, std::int64_t e) {
            const Eigen::RowVectorXd w = a.weights.row(i).segment(b, e - b);
            const Eigen::RowVectorXd ds =
                w.array() * ((dout.row(i) * v.middleRows(b, e - b).transpose()).array() - delta);
            dq.row(i) += p.softmax_scale * ds * k.middleRows(b, e - b);
            dk.middleRows(b, e - b) += p.softmax_scale * ds.transpose() * q.row(i);
            dv.middleRows(b, e - b) += w.transpose() * dout.row(i);
          });
        }
        for (std::int64_t i = 0; i < seq.q_len; ++i)
          for (std::int64_t d = 0; d < p.head_dim; ++d) p.dq(seq.batch, seq.q_start + i, h, d) = from_double<T>(dq(i, d));
      }
      for (std::int64_t t = 0; t < seq.k_len; ++t) {
        for (std::int64_t d = 0; d < p.head_dim; ++d) {
          p.dk(seq.batch, seq.k_start + t, kv, d) = from_double<T>(dk(t, d));
          p.dv(seq.batch, seq.k_start + t, kv, d) = from_double<T>(dv(t, d));
        }
      }
    }
  }
}

/// One decode step (SPEC §Decode): append each sequence's new key and value to its pages and its
/// block's key sum, then attend from the new query, gating against the running sums.
template <class T>
void decode(const core::decode_params<T>& p) {
  const std::int64_t batch = p.q.extent[0], page_size = p.k_pages.extent[1];
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t n = p.seqlens[b], len = n + 1, block = n / p.block_size;
    const std::int64_t page = p.page_table(b, n / page_size), slot = n % page_size;
    for (std::int64_t kv = 0; kv < p.kv_heads; ++kv) {
      for (std::int64_t d = 0; d < p.head_dim; ++d) {
        p.k_pages(page, slot, kv, d) = p.k_new(b, 0, kv, d);
        p.v_pages(page, slot, kv, d) = p.v_new(b, 0, kv, d);
        // The first token of a block starts its sum, so stale memory never leaks in.
        auto& sum = p.block_key_sums(b, block, kv, d);
        const auto key = static_cast<gate_t<T>>(to_double(p.k_new(b, 0, kv, d)));
        sum = n % p.block_size == 0 ? key : sum + key;
      }
    }
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t kv = p.kv_head(h);
      matrix k(len, p.head_dim), v(len, p.head_dim), q(1, p.head_dim);
      for (std::int64_t t = 0; t < len; ++t) {
        for (std::int64_t d = 0; d < p.head_dim; ++d) {
          k(t, d) = to_double(p.k_pages(p.page_table(b, t / page_size), t % page_size, kv, d));
          v(t, d) = to_double(p.v_pages(p.page_table(b, t / page_size), t % page_size, kv, d));
        }
      }
      matrix means(core::block_count(len, p.block_size), p.head_dim);
      for (std::int64_t j = 0; j < means.rows(); ++j) {
        const double count = static_cast<double>(core::block_end(j, p.block_size, len) - core::block_begin(j, p.block_size));
        for (std::int64_t d = 0; d < p.head_dim; ++d) means(j, d) = to_double(p.block_key_sums(b, j, kv, d)) / count;
      }
      for (std::int64_t d = 0; d < p.head_dim; ++d) q(0, d) = to_double(p.q(b, 0, h, d));
      const head_attention a =
          attend(q, k, gate(q, means, 1, len, p.block_size, p.top_k, p.full), len, p.block_size, p.softmax_scale);
      const matrix o = a.times(v);
      for (std::int64_t d = 0; d < p.head_dim; ++d) p.out(b, 0, h, d) = from_double<T>(o(0, d));
      if (p.lse.given()) p.lse(b, 0, h) = static_cast<accum_t<T>>(a.lse[0]);
      if (p.selected.given()) write_selected(p.selected, b, 0, h, a.blocks[0]);
    }
  }
}

}  // namespace moba::backends::reference

namespace moba {

/// The float64 oracle. Stateless: forward, backward and decode are const, so any number of threads may
/// call one object at once, each call with its own outputs (SPEC §Threads).
template <class Dtype>
struct backend_impl<reference, Dtype> {
  static constexpr const char* name = "moba::reference";
  /// The reference holds two `[q_len, k_len]` double matrices per head; above this it refuses.
  std::int64_t max_score_bytes = std::int64_t{4} << 30;

  explicit backend_impl(const config&) {}
  static bool supports_head_dim(std::int64_t) { return true; }
  static std::string head_dims() { return "any"; }

  /// forward: the caller's selection, if given, is checked entry by entry (SPEC §Blocks 7); the
  /// gate alone needs no O(N²) matrices.
  void check(const core::fwd_params<Dtype>& p) const {
    if (p.selection.given()) detail::check_selection(p);
    if (!p.gate_only) check(static_cast<const core::problem<Dtype>&>(p));
  }
  void check(const core::bwd_params<Dtype>& p) const {
    if (p.selection.given()) detail::check_selection(p);
    check(static_cast<const core::problem<Dtype>&>(p));
  }
  void check(const core::problem<Dtype>& p) const {
    for (std::int64_t s = 0; s < p.seqs.count; ++s) {
      const sequence_info seq = p.seqs[s];
      const double bytes = 16.0 * static_cast<double>(seq.q_len) * static_cast<double>(seq.k_len);
      detail::require(bytes <= static_cast<double>(max_score_bytes), name, " needs ", bytes / (1 << 20),
                      " MiB for sequence ", s, " (q_len = ", seq.q_len, ", k_len = ", seq.k_len,
                      "), over its limit of ", max_score_bytes >> 20, " MiB; use moba::cpu for long sequences");
    }
  }
  void forward(const core::fwd_params<Dtype>& p) const { backends::reference::forward(p); }
  void backward(const core::bwd_params<Dtype>& p) const { backends::reference::backward(p); }
  void decode(const core::decode_params<Dtype>& p) const { backends::reference::decode(p); }
};

}  // namespace moba
