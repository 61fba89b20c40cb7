// SPDX-License-Identifier: MIT
/// @file Checks of a forward call's arguments (SPEC §Bad input), run before anything is written.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <utility>

#include <moba/config.hpp>
#include <moba/core/params.hpp>
#include <moba/error.hpp>
#include <moba/tensor_view.hpp>

namespace moba::detail {

inline void validate_config(const config& cfg) {
  require(cfg.block_size >= 1, "block_size = ", cfg.block_size, "; it must be >= 1");
  require(cfg.top_k >= 1, "top_k = ", cfg.top_k, "; it must be >= 1");
  if (cfg.softmax_scale) {
    require(std::isfinite(*cfg.softmax_scale), "softmax_scale = ", *cfg.softmax_scale, "; it must be finite");
  }
}

/// Byte range [begin, end) a view can touch, with every offset computed without overflow.
struct byte_span {
  std::uintptr_t begin = 0, end = 0;
  bool overlaps(const byte_span& o) const { return begin < o.end && o.begin < end; }
};

template <class T, int Rank>
byte_span checked_span(const tensor_view<T, Rank>& view, const char* name) {
  std::int64_t last = 0;  // offset of the last element
  bool empty = false;
  for (int r = 0; r < Rank; ++r) {
    require(view.extent[r] >= 0, name, ".extent[", r, "] = ", view.extent[r], "; extents must be >= 0");
    require(view.stride[r] >= 0, name, ".stride[", r, "] = ", view.stride[r], "; strides must be >= 0");
    empty |= view.extent[r] == 0;
  }
  if (empty) return {};
  for (int r = 0; r < Rank; ++r) {
    std::int64_t term = 0;
    require(!__builtin_mul_overflow(view.extent[r] - 1, view.stride[r], &term) &&
                !__builtin_add_overflow(last, term, &last),
            name, ": element offsets overflow 64 bits (extent[", r, "] = ", view.extent[r], ", stride[", r,
            "] = ", view.stride[r], ")");
  }
  std::int64_t bytes = 0;
  require(!__builtin_mul_overflow(last + 1, static_cast<std::int64_t>(sizeof(T)), &bytes), name,
          ": byte size overflows 64 bits");
  require(view.data != nullptr, name, " is null but has ", view.size(), " elements");
  require(reinterpret_cast<std::uintptr_t>(view.data) % alignof(T) == 0, name, " = ",
          static_cast<const void*>(view.data), " is not aligned to ", alignof(T), " bytes");
  const auto begin = reinterpret_cast<std::uintptr_t>(view.data);
  return {begin, begin + static_cast<std::uintptr_t>(bytes)};
}

inline void check_cu_seqlens(std::span<const std::int32_t> cu, const char* name, std::int64_t total) {
  require(cu.front() == 0, name, "[0] = ", cu.front(), "; it must be 0");
  for (std::size_t s = 1; s < cu.size(); ++s) {
    require(cu[s] >= cu[s - 1], name, " decreases: ", name, "[", s - 1, "] = ", cu[s - 1], ", ", name, "[", s,
            "] = ", cu[s]);
  }
  require(cu.back() == total, name, "[", cu.size() - 1, "] = ", cu.back(),
          " must equal the number of tokens in the tensor, ", total);
}

template <class T, int Rank>
std::string shape_of(const tensor_view<T, Rank>& v) {
  std::string s = "[";
  for (int r = 0; r < Rank; ++r) s += (r ? ", " : "") + std::to_string(v.extent[r]);
  return s + "]";
}

/// Validates every argument and returns the kernel parameters. Throws moba::invalid_argument.
template <class T>
core::fwd_params<T> make_fwd_params(const config& cfg, view4<const T> q, view4<const T> k, view4<const T> v,
                                    view4<T> out, tensor_view<accum_t<T>, 3> lse,
                                    tensor_view<std::int32_t, 4> selected, std::span<const std::int32_t> cu_q,
                                    std::span<const std::int32_t> cu_k) {
  const byte_span q_bytes = checked_span(q, "q"), k_bytes = checked_span(k, "k"), v_bytes = checked_span(v, "v");
  const byte_span out_bytes = checked_span(out, "out");
  const byte_span lse_bytes = checked_span(lse, "lse"), sel_bytes = checked_span(selected, "selected");

  const std::int64_t batch = q.extent[0], hq = q.extent[2], hkv = k.extent[2], d = q.extent[3];
  require(k.extent[3] == d && v.extent[3] == d, "head dims differ: q has ", d, ", k has ", k.extent[3], ", v has ",
          v.extent[3]);
  require(d >= 1, "head dim = ", d, "; it must be >= 1");
  require(hkv >= 1 && hq >= 1, "head counts must be >= 1: Hq = ", hq, ", Hkv = ", hkv);
  require(hq % hkv == 0, "Hq % Hkv != 0: Hq = ", hq, ", Hkv = ", hkv);
  require(v.extent[2] == hkv, "k and v head counts differ: k has ", hkv, ", v has ", v.extent[2]);
  require(k.extent[0] == batch && v.extent[0] == batch, "batch extents differ: q ", batch, ", k ", k.extent[0],
          ", v ", v.extent[0]);
  require(k.extent[1] == v.extent[1], "k and v token counts differ: k ", k.extent[1], ", v ", v.extent[1]);
  for (const auto& [stride, name] : {std::pair{q.stride[3], "q"}, {k.stride[3], "k"}, {v.stride[3], "v"},
                                     {out.stride[3], "out"}}) {
    require(stride == 1 || d == 1, name, ": the head dim must be contiguous (stride 1); got stride ", stride);
  }
  for (int r = 0; r < 4; ++r) {
    require(out.extent[r] == q.extent[r], "out has shape ", shape_of(out), " but q has ", shape_of(q));
  }

  core::fwd_params<T> p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.selected = selected;
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = d;
  p.block_size = cfg.block_size;
  p.top_k = cfg.top_k;
  p.full = cfg.mode == mode::full;
  p.softmax_scale = cfg.softmax_scale ? *cfg.softmax_scale : 1.0 / std::sqrt(static_cast<double>(d));

  require(cu_q.empty() == cu_k.empty(), "give both cu_seqlens_q and cu_seqlens_k or neither (sizes ", cu_q.size(),
          " and ", cu_k.size(), ")");
  std::int64_t max_q_len = 0, max_k_len = 0;
  if (!cu_q.empty()) {
    require(cu_q.size() == cu_k.size(), "cu_seqlens_q has ", cu_q.size(), " entries but cu_seqlens_k has ",
            cu_k.size());
    require(cu_q.size() >= 2 || (q.extent[1] == 0 && k.extent[1] == 0),
            "cu_seqlens need batch + 1 >= 2 entries; got ", cu_q.size());
    require(batch == 1, "with cu_seqlens the tensors are packed: batch extent must be 1, got ", batch);
    check_cu_seqlens(cu_q, "cu_seqlens_q", q.extent[1]);
    check_cu_seqlens(cu_k, "cu_seqlens_k", k.extent[1]);
    p.seqs = {cu_q.data(), cu_k.data(), static_cast<std::int64_t>(cu_q.size()) - 1, 0, 0};
  } else {
    p.seqs = {nullptr, nullptr, batch, q.extent[1], k.extent[1]};
  }
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    require(seq.q_len <= seq.k_len, "q_len > k_len in sequence ", s, ": q_len = ", seq.q_len, ", k_len = ",
            seq.k_len);
    max_q_len = seq.q_len > max_q_len ? seq.q_len : max_q_len;
    max_k_len = seq.k_len > max_k_len ? seq.k_len : max_k_len;
  }

  if (lse.given()) {
    require(lse.extent[0] == batch && lse.extent[1] == q.extent[1] && lse.extent[2] == hq, "lse has shape ",
            shape_of(lse), "; expected [", batch, ", ", q.extent[1], ", ", hq, "]");
  }
  if (selected.given()) {
    const std::int64_t need = p.full ? (max_k_len + cfg.block_size - 1) / cfg.block_size : cfg.top_k;
    require(selected.extent[0] == batch && selected.extent[1] == q.extent[1] && selected.extent[2] == hq,
            "selected has shape ", shape_of(selected), "; expected [", batch, ", ", q.extent[1], ", ", hq,
            ", width]");
    require(selected.extent[3] >= need, "selected width = ", selected.extent[3], " cannot hold the ", need,
            " blocks a query may select");
  }

  // SPEC §Bad input: an output that overlaps an input (or another output) is refused.
  const std::pair<byte_span, const char*> outputs[] = {{out_bytes, "out"}, {lse_bytes, "lse"}, {sel_bytes, "selected"}};
  const std::pair<byte_span, const char*> inputs[] = {{q_bytes, "q"}, {k_bytes, "k"}, {v_bytes, "v"}};
  for (const auto& [o, oname] : outputs) {
    for (const auto& [i, iname] : inputs) require(!o.overlaps(i), "output ", oname, " overlaps input ", iname);
  }
  require(!out_bytes.overlaps(lse_bytes) && !out_bytes.overlaps(sel_bytes) && !lse_bytes.overlaps(sel_bytes),
          "outputs out, lse and selected must not overlap each other");
  return p;
}

}  // namespace moba::detail
