// SPDX-License-Identifier: MIT
/// @file Test support: random packed inputs, poisoned outputs, relative errors, an independent dense
/// causal attention, and a selection compare that forgives only true near-ties.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include <doctest/doctest.h>
#include <moba/moba.hpp>

namespace moba::test {

/// Sequence lengths and head shape of one test problem, packed varlen.
struct shape {
  std::vector<std::int32_t> q_lens, k_lens;
  std::int64_t hq = 2, hkv = 1, d = 16;
};

/// Host tensors of a packed varlen problem: q `[total_q, hq, d]`, k/v `[total_k, hkv, d]`.
template <class T>
struct tensors {
  shape s;
  std::vector<std::int32_t> cu_q{0}, cu_k{0};
  std::vector<T> q, k, v;
  std::int64_t total_q() const { return cu_q.back(); }
  std::int64_t total_k() const { return cu_k.back(); }
  view4<const T> q_view() const { return packed(q.data(), total_q(), s.hq, s.d); }
  view4<const T> k_view() const { return packed(k.data(), total_k(), s.hkv, s.d); }
  view4<const T> v_view() const { return packed(v.data(), total_k(), s.hkv, s.d); }
};

/// Standard-normal values rounded to T; a drawn exact zero is redrawn so nothing is all-zero by accident.
template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> x(n);
  for (auto& e : x) {
    double r = 0;
    while (r == 0) r = to_double(from_double<T>(normal(rng)));
    e = from_double<T>(r);
  }
  return x;
}

inline std::uint64_t fresh_seed() { return std::random_device{}() * 0x9E3779B97F4A7C15ull + std::random_device{}(); }

/// fresh_seed(), or MOBA_TEST_SEED when set, to replay a failure.
inline std::uint64_t replayable_seed() {
  if (const char* s = std::getenv("MOBA_TEST_SEED")) return std::strtoull(s, nullptr, 0);
  return fresh_seed();
}

template <class T>
tensors<T> random_tensors(const shape& s, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  tensors<T> t;
  t.s = s;
  for (std::size_t i = 0; i < s.q_lens.size(); ++i) {
    t.cu_q.push_back(t.cu_q.back() + s.q_lens[i]);
    t.cu_k.push_back(t.cu_k.back() + s.k_lens[i]);
  }
  t.q = random_values<T>(t.total_q() * s.hq * s.d, rng);
  t.k = random_values<T>(t.total_k() * s.hkv * s.d, rng);
  t.v = random_values<T>(t.total_k() * s.hkv * s.d, rng);
  return t;
}

/// Widen every tensor to double, exactly: the float64 reference runs on the same inputs.
template <class T>
tensors<double> widen(const tensors<T>& t) {
  tensors<double> w;
  w.s = t.s;
  w.cu_q = t.cu_q;
  w.cu_k = t.cu_k;
  for (auto [from, to] : {std::pair{&t.q, &w.q}, {&t.k, &w.k}, {&t.v, &w.v}})
    for (const T& x : *from) to->push_back(to_double(x));
  return w;
}

/// A value no backend writes: NaN for floating types, -7 for block indices.
template <class T>
T poison_value() {
  if constexpr (std::is_same_v<T, std::int32_t>) {
    return -7;
  } else {
    return from_double<T>(std::numeric_limits<double>::quiet_NaN());
  }
}

template <class T>
struct outputs {
  std::vector<T> out;
  std::vector<accum_t<T>> lse;
  std::vector<std::int32_t> selected;  // [total_q, hq, width]
  std::int64_t width = 0;
};

/// How a backend is called on host tensors. Backends whose memory is not the host's specialise this.
template <class Backend, class T>
struct runner {
  static void forward(attention<Backend, T>& attn, const forward_args<T>& args) { attn.forward(args); }
  static void gate(attention<Backend, T>& attn, const forward_args<T>& args) { attn.gate(args); }
  static void backward(attention<Backend, T>& attn, const backward_args<T>& args) { attn.backward(args); }
};

/// Backend options `run` sets before the call: none.
struct default_options {
  template <class Attention>
  void operator()(Attention&) const {}
};

/// Runs `Backend` on `t` with poisoned outputs (lse and selection included); the selection view is
/// `extra_width` entries wider than it needs to be; `options(attn)` may set backend options first.
template <class Backend, class T, class Options = default_options>
outputs<T> run(const tensors<T>& t, const config& cfg, std::int64_t extra_width = 0, Options options = {}) {
  outputs<T> o;
  std::int64_t max_k = 0;
  for (auto len : t.s.k_lens) max_k = std::max<std::int64_t>(max_k, len);
  o.width = (cfg.mode == mode::full ? std::max<std::int64_t>(1, core::block_count(max_k, cfg.block_size)) : cfg.top_k) +
            extra_width;
  o.out.assign(t.total_q() * t.s.hq * t.s.d, poison_value<T>());
  o.lse.assign(t.total_q() * t.s.hq, poison_value<accum_t<T>>());
  o.selected.assign(t.total_q() * t.s.hq * o.width, poison_value<std::int32_t>());
  attention<Backend, T> attn(cfg);
  options(attn);
  runner<Backend, T>::forward(attn, {.q = t.q_view(),
                                     .k = t.k_view(),
                                     .v = t.v_view(),
                                     .out = packed(o.out.data(), t.total_q(), t.s.hq, t.s.d),
                                     .lse = bsh(o.lse.data(), 1, t.total_q(), t.s.hq),
                                     .selected = selection(o.selected.data(), 1, t.total_q(), t.s.hq, o.width),
                                     .cu_seqlens_q = t.cu_q,
                                     .cu_seqlens_k = t.cu_k});
  return o;
}

/// The spacing of T's denormals (its smallest positive value): 2^-1074, 2^-149, 2^-24 (float16), 2^-133 (bfloat16).
template <class T>
double denormal_spacing() {
  if constexpr (std::is_floating_point_v<T>) {
    return std::numeric_limits<T>::denorm_min();
  } else {
    return to_double(T::from_bits(1));
  }
}

/// SPEC §Precision's measure over the rows kept (`keep[row]`, rows of `row_len` elements), in double:
/// (‖a − b‖ − δ·√n) / ‖b‖, floored at 0, with n the elements compared and δ the denormal spacing of
/// A (the dtype under test), so that `rel_error(a, b) <= bound` says ‖a − b‖ ≤ bound·‖b‖ + δ·√n.
/// Outside the denormal range the δ term is far below any bound. NaN or ±inf anywhere fails.
template <class A, class B>
double rel_error(const std::vector<A>& a, const std::vector<B>& b, std::size_t row_len = 1,
                 const std::vector<bool>* keep = nullptr) {
  double num = 0, den = 0, n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (keep && !(*keep)[i / row_len]) continue;
    const double x = to_double(a[i]), y = to_double(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    num += (x - y) * (x - y);
    den += y * y;
    n += 1;
  }
  const double excess = std::max(0.0, std::sqrt(num) - denormal_spacing<A>() * std::sqrt(n));
  return den == 0 ? excess : excess / std::sqrt(den);
}

/// SPEC §Precision: bounds on dq, dk and dv.
template <class T>
constexpr double gradient_bound() {
  if constexpr (std::is_same_v<T, double>) return 1e-10;
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, float16>) return 5e-3;
  return 2e-2;
}

/// SPEC §Precision: bounds on outputs and lse.
template <class T>
constexpr double output_bound() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  if constexpr (std::is_same_v<T, float>) return 2e-6;
  if constexpr (std::is_same_v<T, float16>) return 2e-3;
  return 1e-2;
}

/// Relative rounding of a gate score computed in gate_t<T> (fp32 or fp64) from D products.
template <class T>
double gate_tolerance(std::int64_t d) {
  const double eps = std::is_same_v<gate_t<T>, double> ? 1.1e-16 : 6e-8;
  return 4.0 * static_cast<double>(d + 2) * eps;
}

/// Absolute rounding of a gate score below the gate type's normal range (SPEC §Precision): each mean
/// element, product and sum may round to the type's denormal spacing, so a score is also uncertain by
/// (Σ|q_e| + D + 2) spacings; on all-denormal inputs every score underflows to a tie.
template <class T>
double gate_underflow(std::int64_t d, double q_abs_sum) {
  return 2.0 * (q_abs_sum + static_cast<double>(d + 2)) * std::numeric_limits<gate_t<T>>::denorm_min();
}

/// Dense causal attention in double, written independently of the library (SPEC §Attention with every
/// past key): out `[total_q, hq, d]`, lse `[total_q, hq]`.
/// Attention written out in the test, independent of every backend: query row (token `row`,
/// head h) at position pos attends key j <= pos where `attends(row, h, pos, j)`.
template <class Attends>
void masked_attention(const tensors<double>& t, double scale, Attends&& attends, std::vector<double>& out,
                      std::vector<double>& lse) {
  const auto& s = t.s;
  out.assign(t.total_q() * s.hq * s.d, 0);
  lse.assign(t.total_q() * s.hq, 0);
  for (std::size_t b = 0; b + 1 < t.cu_q.size(); ++b) {
    const std::int64_t q_len = t.cu_q[b + 1] - t.cu_q[b], k_len = t.cu_k[b + 1] - t.cu_k[b];
    for (std::int64_t i = 0; i < q_len; ++i) {
      const std::int64_t row = t.cu_q[b] + i, pos = k_len - q_len + i;
      for (std::int64_t h = 0; h < s.hq; ++h) {
        const std::int64_t kh = h / (s.hq / s.hkv);
        std::vector<double> logit(pos + 1, -std::numeric_limits<double>::infinity());
        for (std::int64_t j = 0; j <= pos; ++j) {
          if (!attends(row, h, pos, j)) continue;
          double dot = 0;
          for (std::int64_t e = 0; e < s.d; ++e)
            dot += t.q[(row * s.hq + h) * s.d + e] * t.k[((t.cu_k[b] + j) * s.hkv + kh) * s.d + e];
          logit[j] = scale * dot;
        }
        const double m = *std::max_element(logit.begin(), logit.end());
        double sum = 0;
        for (double& l : logit) sum += (l = std::exp(l - m));
        for (std::int64_t j = 0; j <= pos; ++j)
          for (std::int64_t e = 0; e < s.d; ++e)
            out[(row * s.hq + h) * s.d + e] += logit[j] / sum * t.v[((t.cu_k[b] + j) * s.hkv + kh) * s.d + e];
        lse[row * s.hq + h] = m + std::log(sum);
      }
    }
  }
}

inline void dense_causal(const tensors<double>& t, double scale, std::vector<double>& out, std::vector<double>& lse) {
  masked_attention(t, scale, [](std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return true; }, out, lse);
}

/// Rows (token × head) whose selection differs from the reference's. Throws a doctest failure
/// unless every difference is a near-tie: each block the backend chose instead of the reference's
/// must score within gate rounding of the one it displaced (SPEC §Precision).
template <class T>
std::vector<bool> agreeing_rows(const tensors<T>& t, const config& cfg, const std::vector<std::int32_t>& got,
                                const std::vector<std::int32_t>& want, std::int64_t width, std::int64_t* flips) {
  const auto& s = t.s;
  const tensors<double> w = widen(t);
  std::vector<bool> keep(t.total_q() * s.hq, true);
  *flips = 0;
  for (std::size_t b = 0; b + 1 < t.cu_q.size(); ++b) {
    const std::int64_t q_len = t.cu_q[b + 1] - t.cu_q[b], k_len = t.cu_k[b + 1] - t.cu_k[b];
    for (std::int64_t i = 0; i < q_len; ++i) {
      for (std::int64_t h = 0; h < s.hq; ++h) {
        const std::int64_t row = (t.cu_q[b] + i) * s.hq + h;
        std::set<std::int32_t> g(got.begin() + row * width, got.begin() + (row + 1) * width);
        std::set<std::int32_t> r(want.begin() + row * width, want.begin() + (row + 1) * width);
        if (g == r) continue;
        // Score of block j for this query, and its rounding scale Σ|q_e · kbar_e|.
        const std::int64_t kh = h / (s.hq / s.hkv);
        double q_abs = 0;
        for (std::int64_t e = 0; e < s.d; ++e) q_abs += std::abs(w.q[row * s.d + e]);
        auto score = [&](std::int32_t j, double* magnitude) {
          const std::int64_t begin = j * cfg.block_size, end = std::min<std::int64_t>(k_len, begin + cfg.block_size);
          double dot = 0, mag = 0;
          for (std::int64_t e = 0; e < s.d; ++e) {
            double mean = 0;
            for (std::int64_t x = begin; x < end; ++x) mean += w.k[((t.cu_k[b] + x) * s.hkv + kh) * s.d + e];
            mean /= static_cast<double>(end - begin);
            dot += w.q[row * s.d + e] * mean;
            mag += std::abs(w.q[row * s.d + e] * mean);
          }
          *magnitude = mag;
          return dot;
        };
        std::vector<std::int32_t> extra, missing;
        std::set_difference(g.begin(), g.end(), r.begin(), r.end(), std::back_inserter(extra));
        std::set_difference(r.begin(), r.end(), g.begin(), g.end(), std::back_inserter(missing));
        REQUIRE_MESSAGE(extra.size() == missing.size(), "selection sizes differ at row ", row);
        for (std::size_t x = 0; x < extra.size(); ++x) {
          double m1 = 0, m2 = 0;
          const double s1 = score(extra[x], &m1), s2 = score(missing[x], &m2);
          REQUIRE_MESSAGE(std::abs(s1 - s2) <= gate_tolerance<T>(s.d) * std::max(m1, m2) + gate_underflow<T>(s.d, q_abs),
                          "row ", row, " selects block ", extra[x], " (score ", s1, ") instead of ", missing[x],
                          " (score ", s2, "): not a near-tie");
        }
        keep[row] = false;
        ++*flips;
      }
    }
  }
  return keep;
}

}  // namespace moba::test
