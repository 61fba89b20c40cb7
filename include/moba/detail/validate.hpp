// SPDX-License-Identifier: MIT
/// @file Checks of the arguments of every pass (SPEC §Bad input), run before anything is written.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <moba/args.hpp>
#include <moba/config.hpp>
#include <moba/core/blocks.hpp>
#include <moba/core/gate.hpp>
#include <moba/core/params.hpp>
#include <moba/error.hpp>
#include <moba/kv_cache.hpp>
#include <moba/tensor_view.hpp>

namespace moba::detail {

/// Largest |softmax_scale| accepted (SPEC §Inputs): beyond it the scaled scores of ordinary inputs
/// overflow the fp32 arithmetic of the fast backends.
inline constexpr double max_softmax_scale = 65536;

inline void validate_config(const config& cfg) {
  require(cfg.block_size >= 1, "block_size = ", cfg.block_size, "; it must be >= 1");
  require(cfg.top_k >= 1, "top_k = ", cfg.top_k, "; it must be >= 1");
  if (cfg.softmax_scale) {
    require(std::isfinite(*cfg.softmax_scale) && std::abs(*cfg.softmax_scale) <= max_softmax_scale, "softmax_scale = ",
            *cfg.softmax_scale, "; it must be finite with |softmax_scale| <= ", max_softmax_scale);
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

/// SPEC §Bad input: no two elements of an output share memory (a zero stride, or a head stride that
/// aliases the dim axis). Sufficient test: with the axes of extent > 1 sorted by stride, each stride
/// steps past every element the smaller axes reach. Run after checked_span (no overflow here).
template <class T, int Rank>
void require_distinct_elements(const tensor_view<T, Rank>& view, const char* name) {
  if (view.size() == 0) return;
  int axes[Rank];
  int n = 0;
  for (int r = 0; r < Rank; ++r)
    if (view.extent[r] > 1) axes[n++] = r;
  for (int x = 1; x < n; ++x)  // insertion sort by stride (std::sort on 4 ints trips GCC 12's -Warray-bounds)
    for (int y = x; y > 0 && view.stride[axes[y]] < view.stride[axes[y - 1]]; --y) std::swap(axes[y], axes[y - 1]);
  std::int64_t reach = 0;  // offset of the farthest element of the axes so far
  for (int x = 0; x < n; ++x) {
    const int r = axes[x];
    require(view.stride[r] > reach, name, " overlaps itself: stride[", r, "] = ", view.stride[r], " (extent ",
            view.extent[r], ") revisits elements that the axes of smaller stride reach (offset ", reach, ")");
    reach += (view.extent[r] - 1) * view.stride[r];
  }
}

/// Bytes of a host metadata array the backend reads during the call (offsets, page tables, lengths).
template <class T>
byte_span span_of(std::span<T> a) {
  const auto begin = reinterpret_cast<std::uintptr_t>(a.data());
  return {begin, begin + a.size_bytes()};
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

template <class T, int Rank>
void require_shape(const tensor_view<T, Rank>& view, const char* name, const tensor_view<const T, Rank>& like,
                   const char* like_name) {
  for (int r = 0; r < Rank; ++r) {
    require(view.extent[r] == like.extent[r], name, " has shape ", shape_of(view), " but ", like_name, " has ",
            shape_of(like));
  }
  require(view.stride[Rank - 1] == 1 || view.extent[Rank - 1] == 1, name,
          ": the head dim must be contiguous (stride 1); got stride ", view.stride[Rank - 1]);
}

inline core::attention_shape make_shape(const config& cfg, std::int64_t hq, std::int64_t hkv, std::int64_t d) {
  core::attention_shape a;
  a.q_heads = hq;
  a.kv_heads = hkv;
  a.head_dim = d;
  a.block_size = cfg.block_size;
  a.top_k = cfg.top_k;
  a.full = cfg.mode == mode::full;
  a.softmax_scale = cfg.softmax_scale ? *cfg.softmax_scale : 1.0 / std::sqrt(static_cast<double>(d));
  return a;
}

/// Checks the optional lse `[batch, seq, Hq]` and selection `[batch, seq, Hq, width >= need]` shapes.
template <class A>
void require_optional_outputs(const tensor_view<A, 3>& lse, const tensor_view<std::int32_t, 4>& selected,
                              std::int64_t batch, std::int64_t seq, std::int64_t hq, std::int64_t need) {
  if (lse.given()) {
    require(lse.extent[0] == batch && lse.extent[1] == seq && lse.extent[2] == hq, "lse has shape ",
            shape_of(lse), "; expected [", batch, ", ", seq, ", ", hq, "]");
  }
  if (selected.given()) {
    require(selected.extent[0] == batch && selected.extent[1] == seq && selected.extent[2] == hq,
            "selected has shape ", shape_of(selected), "; expected [", batch, ", ", seq, ", ", hq, ", width]");
    require(selected.extent[3] >= need, "selected width = ", selected.extent[3], " cannot hold the ", need,
            " blocks a query may select");
  }
}

/// Checks the inputs every pass shares and fills the common parameters.
template <class T>
core::problem<T> make_problem(const config& cfg, view4<const T> q, view4<const T> k, view4<const T> v,
                              std::span<const std::int32_t> cu_q, std::span<const std::int32_t> cu_k,
                              const device_offsets& dev = {}) {
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
  for (const auto& [stride, name] : {std::pair{q.stride[3], "q"}, {k.stride[3], "k"}, {v.stride[3], "v"}}) {
    require(stride == 1 || d == 1, name, ": the head dim must be contiguous (stride 1); got stride ", stride);
  }

  core::problem<T> p;
  static_cast<core::attention_shape&>(p) = make_shape(cfg, hq, hkv, d);
  p.q = q;
  p.k = k;
  p.v = v;

  require(cu_q.empty() == cu_k.empty(), "give both cu_seqlens_q and cu_seqlens_k or neither (sizes ", cu_q.size(),
          " and ", cu_k.size(), ")");
  if (dev.given()) {
    require(cu_q.empty(), "give cu_seqlens on the host or device_seqlens, not both");
    require(dev.cu_seqlens_q != nullptr && dev.cu_seqlens_k != nullptr,
            "device_seqlens needs both cu_seqlens_q and cu_seqlens_k");
    for (const auto* a : {dev.cu_seqlens_q, dev.cu_seqlens_k})
      require(reinterpret_cast<std::uintptr_t>(a) % alignof(std::int32_t) == 0, "device_seqlens offsets at ",
              static_cast<const void*>(a), " are not aligned to 4 bytes");
    require(batch == 1, "with device_seqlens the tensors are packed: batch extent must be 1, got ", batch);
    require(dev.batch >= 0 && dev.batch < std::numeric_limits<std::int32_t>::max(), "device_seqlens.batch = ", dev.batch,
            "; it must be in [0, 2^31 - 1)");
    require(dev.max_seqlen_q >= 0 && dev.max_seqlen_k >= 0, "device_seqlens max_seqlen_q = ", dev.max_seqlen_q,
            ", max_seqlen_k = ", dev.max_seqlen_k, "; they must be >= 0");
    p.seqs = {dev.cu_seqlens_q, dev.cu_seqlens_k, dev.batch, 0, 0, std::min(dev.max_seqlen_q, q.extent[1]),
              std::min(dev.max_seqlen_k, k.extent[1]), true};
    return p;
  }
  if (!cu_q.empty()) {
    require(cu_q.size() == cu_k.size(), "cu_seqlens_q has ", cu_q.size(), " entries but cu_seqlens_k has ",
            cu_k.size());
    require(cu_q.size() >= 2 || (q.extent[1] == 0 && k.extent[1] == 0), "cu_seqlens need batch + 1 >= 2 entries; got ", cu_q.size());
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
    p.seqs.max_q_len = std::max(p.seqs.max_q_len, seq.q_len);
    p.seqs.max_k_len = std::max(p.seqs.max_k_len, seq.k_len);
  }
  return p;
}

/// The offsets a call reads, as byte ranges: outputs must not overlap them either (SPEC §Bad input).
inline std::pair<byte_span, byte_span> offset_spans(std::span<const std::int32_t> cu_q, std::span<const std::int32_t> cu_k,
                                                    const device_offsets& dev) {
  if (!dev.given()) return {span_of(cu_q), span_of(cu_k)};
  const auto n = static_cast<std::size_t>(std::max<std::int64_t>(0, dev.batch) + 1);
  return {span_of(std::span(dev.cu_seqlens_q, dev.cu_seqlens_q ? n : 0)),
          span_of(std::span(dev.cu_seqlens_k, dev.cu_seqlens_k ? n : 0))};
}

/// Entries a selection output needs for sequences of at most `max_k_len` keys (SPEC §Blocks 5).
inline std::int64_t needed_width(const core::attention_shape& a, std::int64_t max_k_len) {
  return max_k_len == 0 ? 0 : core::selection_width(core::current_block(max_k_len - 1, a.block_size), a.top_k, a.full);
}

/// SPEC §Bad input: no output may overlap an input or another output.
inline void require_disjoint(std::initializer_list<std::pair<byte_span, const char*>> outputs,
                             std::initializer_list<std::pair<byte_span, const char*>> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (const auto& [i, iname] : inputs) require(!o->first.overlaps(i), "output ", o->second, " overlaps input ", iname);
    for (auto o2 = o + 1; o2 != outputs.end(); ++o2)
      require(!o->first.overlaps(o2->first), "outputs ", o->second, " and ", o2->second, " overlap");
  }
}

/// A selection input (SPEC §Blocks 7), when given, is `[batch, q_tokens, Hq, width >= 1]` like q.
template <class T>
void require_selection_shape(const tensor_view<const std::int32_t, 4>& g, const view4<const T>& q, std::int64_t q_heads) {
  if (!g.given()) return;
  require(g.extent[0] == q.extent[0] && g.extent[1] == q.extent[1] && g.extent[2] == q_heads && g.extent[3] >= 1,
          "selection has shape ", shape_of(g), "; expected [", q.extent[0], ", ", q.extent[1], ", ", q_heads, ", width >= 1]");
}

/// Validates every argument of a forward call (attention::gate: `gate_only`, no out or lse) and
/// returns its parameters. Throws moba::invalid_argument.
template <class T>
core::fwd_params<T> make_fwd_params(const config& cfg, const forward_args<T>& a, bool gate_only = false) {
  const byte_span q_bytes = checked_span(a.q, "q"), k_bytes = checked_span(a.k, "k"), v_bytes = checked_span(a.v, "v");
  const byte_span out_bytes = checked_span(a.out, "out");
  const byte_span lse_bytes = checked_span(a.lse, "lse"), sel_bytes = checked_span(a.selected, "selected");
  const byte_span given_bytes = checked_span(a.selection, "selection");
  require_distinct_elements(a.out, "out");
  require_distinct_elements(a.lse, "lse");
  require_distinct_elements(a.selected, "selected");
  core::fwd_params<T> p;
  static_cast<core::problem<T>&>(p) = make_problem(cfg, a.q, a.k, a.v, a.cu_seqlens_q, a.cu_seqlens_k, a.device_seqlens);
  if (gate_only) {
    require(a.selected.given(), "gate writes selected: give it");
    require(!a.out.given() && !a.lse.given() && !a.selection.given(),
            "gate writes only selected: leave out, lse and selection empty");
  } else {
    require_shape(a.out, "out", a.q, "q");
  }
  p.out = a.out;
  p.lse = a.lse;
  p.selected = a.selected;
  p.selection = a.selection;
  p.gate_only = gate_only;
  require_optional_outputs(a.lse, a.selected, a.q.extent[0], a.q.extent[1], p.q_heads, needed_width(p, p.seqs.max_k_len));
  if (a.selection.given()) require(!a.selected.given(), "give selection (an input) or selected (an output), not both");
  require_selection_shape(a.selection, a.q, p.q_heads);
  const auto [cu_q_bytes, cu_k_bytes] = offset_spans(a.cu_seqlens_q, a.cu_seqlens_k, a.device_seqlens);
  require_disjoint({{out_bytes, "out"}, {lse_bytes, "lse"}, {sel_bytes, "selected"}},
                   {{q_bytes, "q"}, {k_bytes, "k"}, {v_bytes, "v"}, {given_bytes, "selection"},
                    {cu_q_bytes, "cu_seqlens_q"}, {cu_k_bytes, "cu_seqlens_k"}});
  return p;
}

/// The entries of a host selection input (SPEC §Blocks 7): per query and head, ascending blocks in
/// [0, current block], the current block among them, then only -1 padding. Throws naming the first
/// bad entry. Backends that read the selection from host memory call it in check() (forward and
/// backward parameters alike).
template <class Params>
void check_selection(const Params& p) {
  const auto& g = p.selection;
  for (std::int64_t s = 0; s < p.seqs.count; ++s) {
    const sequence_info seq = p.seqs[s];
    for (std::int64_t i = 0; i < seq.q_len; ++i) {
      const std::int64_t t = seq.q_start + i, c = core::current_block(seq.pos(i), p.block_size);
      for (std::int64_t h = 0; h < p.q_heads; ++h) {
        std::int64_t last = -1;
        bool padding = false;
        for (std::int64_t w = 0; w < g.extent[3]; ++w) {
          const std::int32_t j = g(seq.batch, t, h, w);
          if (j == -1) {
            padding = true;
            continue;
          }
          require(!padding && j >= 0 && j <= c && j > last, "selection(", seq.batch, ", ", t, ", ", h, ", ", w, ") = ", j,
                  ": entries must ascend, lie in [0, ", c, "] (the query's current block) and be followed only by -1");
          last = j;
        }
        require(last == c, "selection(", seq.batch, ", ", t, ", ", h, ", :) lacks the query's current block ", c);
      }
    }
  }
}

/// Validates every argument of a backward call and returns its parameters. Throws moba::invalid_argument.
template <class T>
core::bwd_params<T> make_bwd_params(const config& cfg, const backward_args<T>& a) {
  const auto& [q, k, v, out, dout, lse, dq, dk, dv, cu_q, cu_k, given] = a;
  const byte_span q_bytes = checked_span(q, "q"), k_bytes = checked_span(k, "k"), v_bytes = checked_span(v, "v");
  const byte_span out_bytes = checked_span(out, "out"), dout_bytes = checked_span(dout, "dout");
  const byte_span lse_bytes = checked_span(lse, "lse");
  const byte_span dq_bytes = checked_span(dq, "dq"), dk_bytes = checked_span(dk, "dk"), dv_bytes = checked_span(dv, "dv");
  const byte_span given_bytes = checked_span(given, "selection");
  core::bwd_params<T> p;
  static_cast<core::problem<T>&>(p) = make_problem(cfg, q, k, v, cu_q, cu_k);
  require(out.given() && lse.given(), "backward needs the forward's out and lse");
  for (const auto& [view, name] : {std::pair{out, "out"}, {dout, "dout"}}) {
    for (int r = 0; r < 4; ++r)
      require(view.extent[r] == q.extent[r], name, " has shape ", shape_of(view), " but q has ", shape_of(q));
  }
  require_shape(dq, "dq", q, "q");
  require_shape(dk, "dk", k, "k");
  require_shape(dv, "dv", v, "v");
  require(lse.extent[0] == q.extent[0] && lse.extent[1] == q.extent[1] && lse.extent[2] == p.q_heads,
          "lse has shape ", shape_of(lse), "; expected [", q.extent[0], ", ", q.extent[1], ", ", p.q_heads, "]");
  p.out = out;
  p.dout = dout;
  p.lse = lse;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  require_selection_shape(given, q, p.q_heads);
  p.selection = given;
  require_distinct_elements(dq, "dq");
  require_distinct_elements(dk, "dk");
  require_distinct_elements(dv, "dv");
  require_disjoint({{dq_bytes, "dq"}, {dk_bytes, "dk"}, {dv_bytes, "dv"}},
                   {{q_bytes, "q"}, {k_bytes, "k"}, {v_bytes, "v"}, {out_bytes, "out"}, {dout_bytes, "dout"},
                    {lse_bytes, "lse"}, {given_bytes, "selection"}, {span_of(cu_q), "cu_seqlens_q"},
                    {span_of(cu_k), "cu_seqlens_k"}});
  return p;
}

/// Validates every argument of a decode call and returns its parameters. Throws moba::invalid_argument.
template <class T>
core::decode_params<T> make_decode_params(const config& cfg, view4<const T> q, view4<const T> k_new,
                                          view4<const T> v_new, const paged_kv_cache<T>& cache, view4<T> out,
                                          tensor_view<accum_t<T>, 3> lse, tensor_view<std::int32_t, 4> selected) {
  const byte_span q_bytes = checked_span(q, "q"), k_bytes = checked_span(k_new, "k_new");
  const byte_span v_bytes = checked_span(v_new, "v_new"), out_bytes = checked_span(out, "out");
  const byte_span lse_bytes = checked_span(lse, "lse"), sel_bytes = checked_span(selected, "selected");
  const byte_span kp_bytes = checked_span(cache.k_pages, "cache.k_pages");
  const byte_span vp_bytes = checked_span(cache.v_pages, "cache.v_pages");
  const byte_span sums_bytes = checked_span(cache.block_key_sums, "cache.block_key_sums");
  const byte_span table_bytes = checked_span(cache.page_table, "cache.page_table");
  require_distinct_elements(out, "out");
  require_distinct_elements(cache.k_pages, "cache.k_pages");
  require_distinct_elements(cache.v_pages, "cache.v_pages");
  require_distinct_elements(lse, "lse");
  require_distinct_elements(selected, "selected");
  require_distinct_elements(cache.block_key_sums, "cache.block_key_sums");

  const std::int64_t batch = q.extent[0], hq = q.extent[2], hkv = k_new.extent[2], d = q.extent[3];
  require(q.extent[1] == 1, "decode takes one new token per sequence: q has ", q.extent[1]);
  require(hkv >= 1 && hq >= 1 && hq % hkv == 0, "Hq % Hkv != 0: Hq = ", hq, ", Hkv = ", hkv);
  const std::int64_t kv_shape[] = {batch, 1, hkv, d};
  for (const auto& [view, name] : {std::pair{k_new, "k_new"}, {v_new, "v_new"}}) {
    for (int r = 0; r < 4; ++r)
      require(view.extent[r] == kv_shape[r], name, " has shape ", shape_of(view), "; expected [", batch, ", 1, ",
              hkv, ", ", d, "]");
  }
  require_shape(out, "out", q, "q");
  for (const auto& [stride, name] : {std::pair{q.stride[3], "q"}, {k_new.stride[3], "k_new"},
                                     {v_new.stride[3], "v_new"}, {cache.k_pages.stride[3], "cache.k_pages"},
                                     {cache.v_pages.stride[3], "cache.v_pages"}}) {
    require(stride == 1 || d == 1, name, ": the head dim must be contiguous (stride 1); got stride ", stride);
  }
  const auto& kp = cache.k_pages;
  const std::int64_t pages = kp.extent[0], page_size = kp.extent[1];
  for (int r = 0; r < 4; ++r) {
    require(cache.v_pages.extent[r] == kp.extent[r], "cache.v_pages has shape ", shape_of(cache.v_pages),
            " but cache.k_pages has ", shape_of(kp));
  }
  require(kp.extent[2] == hkv && kp.extent[3] == d, "cache.k_pages has shape ", shape_of(kp), "; expected [pages, ",
          "page_size, ", hkv, ", ", d, "]");
  require(page_size >= 1, "cache page_size = ", page_size, "; it must be >= 1");
  const auto& sums = cache.block_key_sums;
  require(sums.extent[0] == batch && sums.extent[2] == hkv && sums.extent[3] == d, "cache.block_key_sums has shape ",
          shape_of(sums), "; expected [", batch, ", max_blocks, ", hkv, ", ", d, "]");
  require(cache.page_table.extent[0] == batch, "cache.page_table has ", cache.page_table.extent[0],
          " rows for ", batch, " sequences");
  require(static_cast<std::int64_t>(cache.seqlens.size()) == batch, "cache.seqlens has ", cache.seqlens.size(),
          " entries for ", batch, " sequences");
  std::int64_t max_len = 0;
  std::vector<std::int64_t> written(batch);  // the cache slot (page · page_size + slot) each sequence writes
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t n = cache.seqlens[b], len = n + 1;
    require(n >= 0, "cache.seqlens[", b, "] = ", n, "; it must be >= 0");
    require(n / page_size < cache.page_table.extent[1], "sequence ", b, " needs ", len,
            " cache slots but its page table holds ", cache.page_table.extent[1], " pages of ", page_size);
    require(core::block_count(len, cfg.block_size) <= sums.extent[1], "sequence ", b, " needs ",
            core::block_count(len, cfg.block_size), " block sums but cache.block_key_sums holds ", sums.extent[1]);
    for (std::int64_t pg = 0; pg <= n / page_size; ++pg) {
      const std::int32_t page = cache.page_table(b, pg);
      require(page >= 0 && page < pages, "cache.page_table(", b, ", ", pg, ") = ", page, " is not a page in [0, ",
              pages, ")");
    }
    written[b] = cache.page_table(b, n / page_size) * page_size + n % page_size;
    max_len = std::max(max_len, len);
  }
  std::vector<std::int64_t> order(batch);
  for (std::int64_t b = 0; b < batch; ++b) order[b] = b;
  std::sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) { return written[x] < written[y]; });
  for (std::int64_t x = 1; x < batch; ++x)
    require(written[order[x]] != written[order[x - 1]], "sequences ", order[x - 1], " and ", order[x],
            " would write the same cache slot (page ", written[order[x]] / page_size, ", slot ",
            written[order[x]] % page_size, ")");
  core::decode_params<T> p;
  static_cast<core::attention_shape&>(p) = make_shape(cfg, hq, hkv, d);
  require_optional_outputs(lse, selected, batch, 1, hq, needed_width(p, max_len));
  require_disjoint({{out_bytes, "out"}, {lse_bytes, "lse"}, {sel_bytes, "selected"}, {kp_bytes, "cache.k_pages"},
                    {vp_bytes, "cache.v_pages"}, {sums_bytes, "cache.block_key_sums"}},
                   {{q_bytes, "q"}, {k_bytes, "k_new"}, {v_bytes, "v_new"}, {table_bytes, "cache.page_table"},
                    {span_of(cache.seqlens), "cache.seqlens"}});
  p.q = q;
  p.k_new = k_new;
  p.v_new = v_new;
  p.k_pages = cache.k_pages;
  p.v_pages = cache.v_pages;
  p.block_key_sums = cache.block_key_sums;
  p.page_table = cache.page_table;
  p.seqlens = cache.seqlens.data();
  p.out = out;
  p.lse = lse;
  p.selected = selected;
  return p;
}

}  // namespace moba::detail
