// SPDX-License-Identifier: MIT
/// @file moba-ref: writes trusted MoBA inputs and outputs as .npy files, and checks other kernels against them.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <moba/moba.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "npy.hpp"

namespace fs = std::filesystem;
namespace npy = moba_ref::npy;
using json = nlohmann::json;

namespace {

/// A user error: reported in one line, exit code 2, no output left behind.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class T>
constexpr const char* npy_descr() {
  if constexpr (std::is_same_v<T, double>) return "<f8";
  if constexpr (std::is_same_v<T, float>) return "<f4";
  if constexpr (std::is_same_v<T, moba::float16>) return "<f2";
  return "<u2";  // bfloat16 bit patterns
}

/// SPEC §Precision bound on outputs and lse for a dtype name.
double spec_bound(const std::string& dtype) {
  if (dtype == "f64") return 1e-12;
  if (dtype == "f32") return 2e-6;
  if (dtype == "f16") return 2e-3;
  return 1e-2;
}

struct settings {
  std::int64_t q_heads = 1, kv_heads = 1, head_dim = 64;
  moba::config cfg;
  std::string dtype = "f32", backend = "reference", mode = "sparse";
  std::optional<double> scale;
};

/// Inputs in dtype T, packed varlen.
template <class T>
struct inputs {
  std::vector<T> q, k, v;
  std::vector<std::int32_t> cu_q, cu_k;
  std::int64_t total_q() const { return cu_q.back(); }
  std::int64_t total_k() const { return cu_k.back(); }
};

/// Runs one backend on `in`; returns out, lse and the selection, all written by the library.
template <class Backend, class T>
void run_backend(const settings& s, const inputs<T>& in, std::vector<T>& out, std::vector<moba::accum_t<T>>& lse,
                 std::vector<std::int32_t>& selected, std::int64_t width) {
  out.assign(in.total_q() * s.q_heads * s.head_dim, T{});
  lse.assign(in.total_q() * s.q_heads, 0);
  selected.assign(in.total_q() * s.q_heads * width, -1);
  moba::attention<Backend, T> attn(s.cfg);
  attn.forward({.q = moba::packed(in.q.data(), in.total_q(), s.q_heads, s.head_dim),
                .k = moba::packed(in.k.data(), in.total_k(), s.kv_heads, s.head_dim),
                .v = moba::packed(in.v.data(), in.total_k(), s.kv_heads, s.head_dim),
                .out = moba::packed(out.data(), in.total_q(), s.q_heads, s.head_dim),
                .lse = moba::bsh(lse.data(), 1, in.total_q(), s.q_heads),
                .selected = moba::selection(selected.data(), 1, in.total_q(), s.q_heads, width),
                .cu_seqlens_q = in.cu_q,
                .cu_seqlens_k = in.cu_k});
}

template <class T>
void run_named_backend(const settings& s, const inputs<T>& in, std::vector<T>& out,
                       std::vector<moba::accum_t<T>>& lse, std::vector<std::int32_t>& selected, std::int64_t width) {
  if (s.backend == "reference") return run_backend<moba::reference, T>(s, in, out, lse, selected, width);
#if __has_include(<moba/backends/cpu/forward.hpp>)
  if (s.backend == "cpu") return run_backend<moba::cpu, T>(s, in, out, lse, selected, width);
#endif
  throw usage_error("moba-ref was built without the " + s.backend + " backend; use --backend reference");
}

/// Computes everything and writes it into `dir` (a fresh temporary folder).
template <class T>
void compute_and_write(const settings& s, const inputs<T>& in, const fs::path& dir, json meta, bool write_inputs) {
  std::int64_t max_k = 0;
  for (std::size_t b = 0; b + 1 < in.cu_k.size(); ++b) max_k = std::max<std::int64_t>(max_k, in.cu_k[b + 1] - in.cu_k[b]);
  const std::int64_t width =
      s.cfg.mode == moba::mode::full ? std::max<std::int64_t>(1, moba::core::block_count(max_k, s.cfg.block_size))
                                     : s.cfg.top_k;
  std::vector<T> out;
  std::vector<moba::accum_t<T>> lse;
  std::vector<std::int32_t> selected;
  run_named_backend<T>(s, in, out, lse, selected, width);

  // The float64 result on the same (already rounded) inputs.
  inputs<double> wide{{}, {}, {}, in.cu_q, in.cu_k};
  for (auto [from, to] : {std::pair{&in.q, &wide.q}, {&in.k, &wide.k}, {&in.v, &wide.v}})
    for (const T& x : *from) to->push_back(moba::to_double(x));
  std::vector<double> out64, lse64;
  std::vector<std::int32_t> selected64;
  run_named_backend<double>(s, wide, out64, lse64, selected64, width);

  const std::int64_t tq = in.total_q(), tk = in.total_k(), hq = s.q_heads, hkv = s.kv_heads, d = s.head_dim;
  if (write_inputs) {
    npy::write((dir / "q.npy").string(), npy_descr<T>(), {tq, hq, d}, in.q.data());
    npy::write((dir / "k.npy").string(), npy_descr<T>(), {tk, hkv, d}, in.k.data());
    npy::write((dir / "v.npy").string(), npy_descr<T>(), {tk, hkv, d}, in.v.data());
    npy::write((dir / "cu_seqlens.npy").string(), "<i4", {static_cast<std::int64_t>(in.cu_q.size())}, in.cu_q.data());
    if (in.cu_k != in.cu_q)
      npy::write((dir / "cu_seqlens_k.npy").string(), "<i4", {static_cast<std::int64_t>(in.cu_k.size())}, in.cu_k.data());
  }
  npy::write((dir / "out.npy").string(), npy_descr<T>(), {tq, hq, d}, out.data());
  npy::write((dir / "out_f64.npy").string(), "<f8", {tq, hq, d}, out64.data());
  npy::write((dir / "lse.npy").string(), npy_descr<moba::accum_t<T>>(), {tq, hq}, lse.data());
  npy::write((dir / "lse_f64.npy").string(), "<f8", {tq, hq}, lse64.data());
  npy::write((dir / "selected.npy").string(), "<i4", {tq, hq, width}, selected.data());

  meta["dtype"] = s.dtype;
  meta["backend"] = s.backend;
  meta["mode"] = s.mode;
  meta["block_size"] = s.cfg.block_size;
  meta["top_k"] = s.cfg.top_k;
  meta["softmax_scale"] = s.scale ? *s.scale : 1.0 / std::sqrt(static_cast<double>(d));
  meta["q_heads"] = hq;
  meta["kv_heads"] = hkv;
  meta["head_dim"] = d;
  meta["cu_seqlens_q"] = in.cu_q;
  meta["cu_seqlens_k"] = in.cu_k;
  meta["selected_width"] = width;
  meta["moba_version"] = moba::version_string;
  meta["bf16_storage"] = "bfloat16 arrays are stored as <u2 bit patterns";
  std::ofstream((dir / "meta.json").string()) << meta.dump(2) << '\n';
}

/// Creates a temporary folder beside `out`, lets `fill` write into it, and renames it to `out` only
/// when everything succeeded; on any error the temporary folder is removed.
template <class Fill>
void write_atomically(const fs::path& out, Fill&& fill) {
  if (fs::exists(out)) throw usage_error("--out " + out.string() + " already exists; choose a new folder");
  const fs::path tmp = out.string() + ".tmp-" + std::to_string(::getpid());
  fs::create_directories(tmp);
  try {
    fill(tmp);
    fs::rename(tmp, out);
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
}

template <class T>
std::vector<T> convert_input(const npy::array& a, const std::string& name, const std::string& dtype) {
  std::vector<T> x(static_cast<std::size_t>(a.count()));
  if (a.descr == npy_descr<T>()) {
    std::memcpy(x.data(), a.data.data(), a.data.size());
  } else if (a.descr == "<f8") {
    const double* src = reinterpret_cast<const double*>(a.data.data());
    for (std::size_t i = 0; i < x.size(); ++i) {
      double v;
      std::memcpy(&v, src + i, sizeof v);
      x[i] = moba::from_double<T>(v);
    }
  } else {
    throw usage_error(name + " has dtype " + a.descr + " but --dtype " + dtype + " needs " + npy_descr<T>() +
                      " (or <f8, converted)");
  }
  return x;
}

std::vector<std::int32_t> read_cu_seqlens(const std::string& path) {
  const npy::array a = npy::read(path);
  if (a.shape.size() != 1) throw usage_error(path + " must be 1-D; it has " + std::to_string(a.shape.size()) + " dims");
  std::vector<std::int32_t> cu(a.count());
  for (std::size_t i = 0; i < cu.size(); ++i) {
    std::int64_t v;
    if (a.descr == "<i4") {
      std::int32_t w;
      std::memcpy(&w, a.data.data() + 4 * i, 4);
      v = w;
    } else if (a.descr == "<i8") {
      std::memcpy(&v, a.data.data() + 8 * i, 8);
    } else {
      throw usage_error(path + " has dtype " + a.descr + "; cu_seqlens must be <i4 or <i8");
    }
    if (v < 0 || v > std::numeric_limits<std::int32_t>::max())
      throw usage_error(path + "[" + std::to_string(i) + "] = " + std::to_string(v) + " is out of range");
    cu[i] = static_cast<std::int32_t>(v);
  }
  return cu;
}

/// Calls f.template operator()<T>() with T the dtype named by `dtype`.
template <class F>
void with_dtype(const std::string& dtype, F&& f) {
  if (dtype == "f64") return f.template operator()<double>();
  if (dtype == "f32") return f.template operator()<float>();
  if (dtype == "f16") return f.template operator()<moba::float16>();
  return f.template operator()<moba::bfloat16>();
}

#if __has_include(<moba/backends/cpu/forward.hpp>)
constexpr bool have_cpu_backend = true;
#else
constexpr bool have_cpu_backend = false;
#endif

void apply_mode(settings& s) {
  // Refuse a backend this build lacks before any work is done.
  if (s.backend == "cuda" || (s.backend == "cpu" && !have_cpu_backend))
    throw usage_error("moba-ref was built without the " + s.backend + " backend; use --backend reference" +
                      (have_cpu_backend ? " or cpu" : ""));
  s.cfg.mode = s.mode == "full" ? moba::mode::full : moba::mode::sparse;
  s.cfg.softmax_scale = s.scale;
}

void generate(settings s, const std::vector<std::int64_t>& seqlens, std::uint64_t seed, const fs::path& out) {
  apply_mode(s);
  if (s.head_dim < 1 || s.q_heads < 1 || s.kv_heads < 1)
    throw usage_error("--q-heads, --kv-heads and --head-dim must be >= 1");
  std::vector<std::int32_t> cu{0};
  for (auto len : seqlens) {
    if (len < 0) throw usage_error("--seqlens has a negative length " + std::to_string(len));
    if (cu.back() + len > std::numeric_limits<std::int32_t>::max())
      throw usage_error("--seqlens add up to more than 2^31 - 1 tokens");
    cu.push_back(static_cast<std::int32_t>(cu.back() + len));
  }
  const double elements = static_cast<double>(cu.back()) * static_cast<double>(s.q_heads + 2 * s.kv_heads) *
                          static_cast<double>(s.head_dim);
  if (elements > 1e11) throw usage_error("the inputs would hold " + std::to_string(elements) + " elements; too large");
  write_atomically(out, [&](const fs::path& dir) {
    with_dtype(s.dtype, [&]<class T>() {
      std::mt19937_64 rng(seed);
      std::normal_distribution<double> normal;
      inputs<T> in;
      in.cu_q = in.cu_k = cu;
      // Drawn in double in the order q, k, v, then rounded once to T.
      for (auto [x, heads] : {std::pair{&in.q, s.q_heads}, {&in.k, s.kv_heads}, {&in.v, s.kv_heads}}) {
        x->resize(cu.back() * heads * s.head_dim);
        for (auto& e : *x) e = moba::from_double<T>(normal(rng));
      }
      json meta{{"command", "generate"}, {"seed", seed}, {"seqlens", seqlens}};
      compute_and_write<T>(s, in, dir, meta, true);
    });
  });
}

void run(settings s, const std::string& q_path, const std::string& k_path, const std::string& v_path,
         const std::string& cu_path, const std::string& cu_k_path, const fs::path& out) {
  apply_mode(s);
  const npy::array q = npy::read(q_path), k = npy::read(k_path), v = npy::read(v_path);
  for (auto [a, name] : {std::pair{&q, &q_path}, {&k, &k_path}, {&v, &v_path}}) {
    if (a->shape.size() != 3) throw usage_error(*name + " must be [tokens, heads, dim]; it has " +
                                                std::to_string(a->shape.size()) + " dims");
  }
  if (k.shape != v.shape) throw usage_error(k_path + " and " + v_path + " have different shapes");
  s.q_heads = q.shape[1];
  s.kv_heads = k.shape[1];
  s.head_dim = q.shape[2];
  if (s.dtype.empty()) {
    s.dtype = q.descr == "<f8" ? "f64" : q.descr == "<f4" ? "f32" : q.descr == "<f2" ? "f16" : "bf16";
  }
  write_atomically(out, [&](const fs::path& dir) {
    with_dtype(s.dtype, [&]<class T>() {
      inputs<T> in{convert_input<T>(q, q_path, s.dtype), convert_input<T>(k, k_path, s.dtype),
                   convert_input<T>(v, v_path, s.dtype), read_cu_seqlens(cu_path),
                   read_cu_seqlens(cu_k_path.empty() ? cu_path : cu_k_path)};
      // Shapes beyond the token counts are the library's to check (it names the argument).
      if (in.cu_q.empty() || in.cu_k.empty()) throw usage_error("cu_seqlens must have at least one entry");
      if (in.cu_q.back() != q.shape[0] || in.cu_k.back() != k.shape[0]) {
        throw usage_error("cu_seqlens end at " + std::to_string(in.cu_q.back()) + " (q) and " +
                          std::to_string(in.cu_k.back()) + " (k) but the tensors hold " + std::to_string(q.shape[0]) +
                          " and " + std::to_string(k.shape[0]) + " tokens");
      }
      json meta{{"command", "run"}, {"inputs", {q_path, k_path, v_path, cu_path, cu_k_path}}};
      compute_and_write<T>(s, in, dir, meta, false);
    });
  });
}

std::vector<double> as_doubles(const npy::array& a, const std::string& name) {
  std::vector<double> x(static_cast<std::size_t>(a.count()));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const char* p = a.data.data() + i * npy::item_size(a.descr);
    if (a.descr == "<f8") {
      std::memcpy(&x[i], p, 8);
    } else if (a.descr == "<f4") {
      float f;
      std::memcpy(&f, p, 4);
      x[i] = f;
    } else if (a.descr == "<f2" || a.descr == "<u2") {
      std::uint16_t bits;
      std::memcpy(&bits, p, 2);
      x[i] = a.descr == "<f2" ? static_cast<double>(moba::float16::from_bits(bits))
                              : static_cast<double>(moba::bfloat16::from_bits(bits));
    } else {
      throw usage_error(name + " has dtype " + a.descr + "; expected a float array (<f8, <f4, <f2, or <u2 for bf16)");
    }
  }
  return x;
}

int check(const fs::path& expected_dir, const std::string& actual_path, const std::string& what,
          std::optional<double> tol) {
  std::ifstream meta_file(expected_dir / "meta.json");
  if (!meta_file) throw usage_error("cannot read " + (expected_dir / "meta.json").string());
  json meta;
  try {
    meta = json::parse(meta_file);
  } catch (const json::exception& e) {
    throw usage_error((expected_dir / "meta.json").string() + ": " + e.what());
  }
  const npy::array expected_npy = npy::read((expected_dir / (what + "_f64.npy")).string());
  const npy::array actual_npy = npy::read(actual_path);
  if (actual_npy.shape != expected_npy.shape) {
    auto dims = [](const std::vector<std::int64_t>& s) { return json(s).dump(); };
    throw usage_error(actual_path + " has shape " + dims(actual_npy.shape) + " but the expected " + what +
                      " has " + dims(expected_npy.shape));
  }
  const std::vector<double> e = as_doubles(expected_npy, "expected"), a = as_doubles(actual_npy, actual_path);
  double num = 0, den = 0, worst = -1;
  std::size_t at = 0;
  for (std::size_t i = 0; i < e.size(); ++i) {
    const double diff = std::abs(a[i] - e[i]);
    num += (a[i] - e[i]) * (a[i] - e[i]);
    den += e[i] * e[i];
    if (!(diff <= worst)) {  // NaN counts as the worst
      worst = std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff;
      at = i;
      if (std::isnan(diff)) num = std::numeric_limits<double>::quiet_NaN();
    }
  }
  const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  const double bound = tol ? *tol : spec_bound(meta.value("dtype", "f32"));
  const auto& shape = expected_npy.shape;
  const std::int64_t heads = shape.size() > 1 ? shape[1] : 1, dim = shape.size() > 2 ? shape[2] : 1;
  std::printf("%s: relative error %.3e (tolerance %.1e, %s)\n", what.c_str(), rel, bound,
              tol ? "--tol" : ("SPEC bound for " + meta.value("dtype", std::string("f32"))).c_str());
  std::printf("largest absolute error %.3e at token %lld, head %lld", worst, static_cast<long long>(at / (heads * dim)),
              static_cast<long long>(at / dim % heads));
  if (shape.size() > 2) std::printf(", dim %lld", static_cast<long long>(at % dim));
  std::printf(" (actual %.9g, expected %.9g)\n", e.empty() ? 0.0 : a[at], e.empty() ? 0.0 : e[at]);
  const bool pass = rel <= bound;
  std::printf("%s\n", pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moba-ref: reference MoBA results as .npy files, for validating other kernels (moba " +
               std::string(moba::version_string) + ")"};
  app.require_subcommand(1);
  settings s;
  std::vector<std::int64_t> seqlens;
  std::uint64_t seed = 0;
  std::string out, q, k, v, cu, cu_k, expected, actual, what = "out";
  std::optional<double> tol;

  auto add_common = [&](CLI::App* c) {
    c->add_option("--block-size", s.cfg.block_size, "keys per block, B >= 1")->required();
    c->add_option("--top-k", s.cfg.top_k, "blocks per query, the current one included, K >= 1")->required();
    c->add_option("--backend", s.backend, "reference or cpu (cuda needs a CUDA build)")
        ->check(CLI::IsMember({"reference", "cpu", "cuda"}));
    c->add_option("--mode", s.mode, "sparse (MoBA gating) or full (dense causal)")->check(CLI::IsMember({"sparse", "full"}));
    c->add_option("--scale", s.scale, "softmax scale (default 1/sqrt(head_dim))");
    c->add_option("--out", out, "output folder; must not exist yet")->required();
  };
  auto* gen = app.add_subcommand("generate", "draw seeded standard-normal q, k, v and write them with the forward pass");
  gen->add_option("--seqlens", seqlens, "sequence lengths, comma-separated (prefill: q_len = k_len)")
      ->required()
      ->delimiter(',');
  gen->add_option("--q-heads", s.q_heads, "query heads")->required();
  gen->add_option("--kv-heads", s.kv_heads, "key/value heads (divides --q-heads)")->required();
  gen->add_option("--head-dim", s.head_dim, "head dimension")->required();
  gen->add_option("--dtype", s.dtype, "f64, f32, f16 or bf16 (bf16 stored as <u2 bits)")
      ->check(CLI::IsMember({"f64", "f32", "f16", "bf16"}));
  gen->add_option("--seed", seed, "random seed");
  add_common(gen);

  auto* runc = app.add_subcommand("run", "compute the forward pass on your own .npy inputs");
  runc->add_option("--q", q, "q.npy [total_q, Hq, D]")->required();
  runc->add_option("--k", k, "k.npy [total_k, Hkv, D]")->required();
  runc->add_option("--v", v, "v.npy [total_k, Hkv, D]")->required();
  runc->add_option("--cu-seqlens", cu, "cu_seqlens.npy (<i4 or <i8), batch + 1 offsets")->required();
  runc->add_option("--cu-seqlens-k", cu_k, "key offsets when they differ from the query's (q_len < k_len)");
  std::string run_dtype;
  runc->add_option("--dtype", run_dtype, "compute dtype (default: q's); <f8 inputs are converted to it")
      ->check(CLI::IsMember({"f64", "f32", "f16", "bf16"}));
  add_common(runc);

  auto* chk = app.add_subcommand("check", "compare an output with the float64 result of a generate/run folder");
  chk->add_option("--expected", expected, "a folder written by generate or run")->required();
  chk->add_option("--actual", actual, "your output .npy (out: [total, Hq, D], lse: [total, Hq])")->required();
  chk->add_option("--what", what, "out or lse")->check(CLI::IsMember({"out", "lse"}));
  chk->add_option("--tol", tol, "relative-error tolerance (default: SPEC's bound for the dtype)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "moba-ref: %s\nRun with --help for usage.\n", e.what());
    return 2;
  }
  try {
    if (gen->parsed()) generate(s, seqlens, seed, out);
    if (runc->parsed()) {
      s.dtype = run_dtype;
      run(s, q, k, v, cu, cu_k, out);
    }
    if (chk->parsed()) return check(expected, actual, what, tol);
    if (!out.empty()) std::printf("wrote %s\n", out.c_str());
    return 0;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "moba-ref: out of memory for these sizes\n");
  } catch (const std::exception& e) {  // usage_error, npy::error, moba::invalid_argument, filesystem errors
    std::fprintf(stderr, "moba-ref: %s\n", e.what());
  }
  return 2;
}
