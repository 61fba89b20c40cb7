// SPDX-License-Identifier: MIT
/// @file moba::reference: SPEC.md taken literally (forward, backward, decode), in double precision, O(N²) memory per head.
/// It is the oracle for every other backend: clarity over speed.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
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

/// One query head of one sequence: the selection of each query (SPEC §Blocks) and the attention
/// weights P `[q_len, k_len]` over its selected, causal keys, with their log-sum-exp.
struct head_attention {
  std::vector<std::vector<std::int64_t>> blocks;  // per query, ascending
  matrix weights;
  std::vector<double> lse;
};

/// `means` are the block representatives the gate scores against (SPEC §Blocks 2).
inline head_attention attend(const matrix& q, const matrix& k, const matrix& means, std::int64_t q_len,
                             std::int64_t k_len, std::int64_t block_size, std::int64_t top_k, bool full, double scale) {
  head_attention a;
  const matrix gate = q * means.transpose();
  const matrix logits = scale * (q * k.transpose());
  a.weights = matrix::Zero(q_len, k_len);
  for (std::int64_t i = 0; i < q_len; ++i) {
    const std::int64_t pos = k_len - q_len + i;
    a.blocks.push_back(select_blocks(gate.row(i).data(), pos, block_size, top_k, full));
    // Every key t of a selected block with t <= pos (causal inside the current block).
    std::vector<std::int64_t> keys;
    for (std::int64_t j : a.blocks.back())
      for (std::int64_t t = core::block_begin(j, block_size); t < core::block_end(j, block_size, pos + 1); ++t)
        keys.push_back(t);
    double max_logit = -std::numeric_limits<double>::infinity(), sum = 0;
    for (std::int64_t t : keys) max_logit = std::max(max_logit, logits(i, t));
    for (std::int64_t t : keys) sum += a.weights(i, t) = std::exp(logits(i, t) - max_logit);
    a.weights.row(i) /= sum;
    a.lse.push_back(max_logit + std::log(sum));
  }
  return a;
}

/// The forward pass of SPEC §Attention for every sequence and query head.
template <class T>
void forward(const core::fwd_params<T>& p) {
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    if (seq.q_len == 0) continue;
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t kv = p.kv_head(h);
      const matrix k = head_rows(p.k, seq.batch, seq.k_start, seq.k_len, kv);
      const head_attention a = attend(head_rows(p.q, seq.batch, seq.q_start, seq.q_len, h), k,
                                      block_means(k, p.block_size), seq.q_len, seq.k_len, p.block_size, p.top_k,
                                      p.full, p.softmax_scale);
      const matrix o = a.weights * head_rows(p.v, seq.batch, seq.k_start, seq.k_len, kv);
      for (std::int64_t i = 0; i < seq.q_len; ++i) {
        const std::int64_t t = seq.q_start + i;
        for (std::int64_t d = 0; d < p.head_dim; ++d) p.out(seq.batch, t, h, d) = from_double<T>(o(i, d));
        if (p.lse.given()) p.lse(seq.batch, t, h) = static_cast<accum_t<T>>(a.lse[i]);
        if (p.selected.given()) {
          const auto& blocks = a.blocks[i];
          for (std::int64_t w = 0; w < p.selected.extent[3]; ++w)
            p.selected(seq.batch, t, h, w) =
                w < static_cast<std::int64_t>(blocks.size()) ? static_cast<std::int32_t>(blocks[w]) : -1;
        }
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
        const matrix w =
            attend(q, k, means, seq.q_len, seq.k_len, p.block_size, p.top_k, p.full, p.softmax_scale).weights;
        const matrix o = w * v;
        const Eigen::VectorXd delta = (dout.array() * o.array()).rowwise().sum();  // δ_i = dout_i · o_i
        const matrix ds = w.array() * ((dout * v.transpose()).colwise() - delta).array();
        const matrix dq = p.softmax_scale * (ds * k);
        dk += p.softmax_scale * (ds.transpose() * q);
        dv += w.transpose() * dout;
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
      const head_attention a = attend(q, k, means, 1, len, p.block_size, p.top_k, p.full, p.softmax_scale);
      const matrix o = a.weights * v;
      for (std::int64_t d = 0; d < p.head_dim; ++d) p.out(b, 0, h, d) = from_double<T>(o(0, d));
      if (p.lse.given()) p.lse(b, 0, h) = static_cast<accum_t<T>>(a.lse[0]);
      if (p.selected.given()) {
        for (std::int64_t w = 0; w < p.selected.extent[3]; ++w)
          p.selected(b, 0, h, w) = w < static_cast<std::int64_t>(a.blocks[0].size()) ? static_cast<std::int32_t>(a.blocks[0][w]) : -1;
      }
    }
  }
}

}  // namespace moba::backends::reference

namespace moba {

template <class Dtype>
struct backend_impl<reference, Dtype> {
  static constexpr const char* name = "moba::reference";
  /// The reference holds two `[q_len, k_len]` double matrices per head; above this it refuses.
  std::int64_t max_score_bytes = std::int64_t{4} << 30;

  explicit backend_impl(const config&) {}
  static bool supports_head_dim(std::int64_t) { return true; }
  static std::string head_dims() { return "any"; }

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
