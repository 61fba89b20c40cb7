// SPDX-License-Identifier: MIT
/// @file moba::reference: SPEC.md taken literally, in double precision, O(N²) memory per head.
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

/// Gate scores s(i, j) = q_i · kbar_j for one query head of one sequence, `[q_len, blocks]`.
template <class T>
matrix gate_scores(const core::fwd_params<T>& p, const sequence_info& seq, std::int64_t h) {
  const matrix keys = head_rows(p.k, seq.batch, seq.k_start, seq.k_len, p.kv_head(h));
  return head_rows(p.q, seq.batch, seq.q_start, seq.q_len, h) * block_means(keys, p.block_size).transpose();
}

/// The whole forward pass of SPEC §Attention for every sequence and query head.
template <class T>
void forward(const core::fwd_params<T>& p) {
  using A = accum_t<T>;
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    if (seq.q_len == 0) continue;
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t kv = p.kv_head(h);
      const matrix q = head_rows(p.q, seq.batch, seq.q_start, seq.q_len, h);
      const matrix k = head_rows(p.k, seq.batch, seq.k_start, seq.k_len, kv);
      const matrix v = head_rows(p.v, seq.batch, seq.k_start, seq.k_len, kv);
      const matrix gate = q * block_means(k, p.block_size).transpose();
      const matrix logits = p.softmax_scale * (q * k.transpose());
      matrix weights = matrix::Zero(seq.q_len, seq.k_len);
      for (std::int64_t i = 0; i < seq.q_len; ++i) {
        const std::int64_t pos = seq.pos(i);
        const auto blocks = select_blocks(gate.row(i).data(), pos, p.block_size, p.top_k, p.full);
        double max_logit = -std::numeric_limits<double>::infinity();
        for (std::int64_t j : blocks)
          for (std::int64_t t = core::block_begin(j, p.block_size); t < core::block_end(j, p.block_size, pos + 1); ++t)
            max_logit = std::max(max_logit, logits(i, t));
        double sum = 0;
        for (std::int64_t j : blocks)
          for (std::int64_t t = core::block_begin(j, p.block_size); t < core::block_end(j, p.block_size, pos + 1); ++t)
            sum += weights(i, t) = std::exp(logits(i, t) - max_logit);
        weights.row(i) /= sum;
        if (p.lse.given()) p.lse(seq.batch, seq.q_start + i, h) = static_cast<A>(max_logit + std::log(sum));
        if (p.selected.given()) {
          for (std::int64_t w = 0; w < p.selected.extent[3]; ++w) {
            p.selected(seq.batch, seq.q_start + i, h, w) =
                w < static_cast<std::int64_t>(blocks.size()) ? static_cast<std::int32_t>(blocks[w]) : -1;
          }
        }
      }
      const matrix o = weights * v;
      for (std::int64_t i = 0; i < seq.q_len; ++i)
        for (std::int64_t d = 0; d < p.head_dim; ++d) p.out(seq.batch, seq.q_start + i, h, d) = from_double<T>(o(i, d));
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

  void check(const core::fwd_params<Dtype>& p) const {
    for (std::int64_t s = 0; s < p.seqs.count; ++s) {
      const sequence_info seq = p.seqs[s];
      const double bytes = 16.0 * static_cast<double>(seq.q_len) * static_cast<double>(seq.k_len);
      detail::require(bytes <= static_cast<double>(max_score_bytes), name, " needs ", bytes / (1 << 20),
                      " MiB for sequence ", s, " (q_len = ", seq.q_len, ", k_len = ", seq.k_len,
                      "), over its limit of ", max_score_bytes >> 20, " MiB; use moba::cpu for long sequences");
    }
  }
  void forward(const core::fwd_params<Dtype>& p) const { backends::reference::forward(p); }
};

}  // namespace moba
