// SPDX-License-Identifier: MIT
/// @file moba-ref: writes trusted MoBA inputs and outputs as .npy files, and checks other kernels against them.
/// It trusts nothing it is given: every option is parsed strictly, every input file is checked against
/// the views built on it, every write is checked, and an output folder appears whole or not at all.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <moba/moba.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <random>
#include <string>
#include <thread>
#include <tuple>
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

/// The storage of a dtype name, and back ("" for a descr that holds no floats).
std::string descr_of(const std::string& dtype) {
  return dtype == "f64" ? "<f8" : dtype == "f32" ? "<f4" : dtype == "f16" ? "<f2" : "<u2";
}
std::string dtype_of(const std::string& descr) {
  return descr == "<f8" ? "f64" : descr == "<f4" ? "f32" : descr == "<f2" ? "f16" : descr == "<u2" ? "bf16" : "";
}

/// SPEC §Precision bound on outputs and lse for a dtype name.
double spec_bound(const std::string& dtype) {
  if (dtype == "f64") return 1e-12;
  if (dtype == "f32") return 2e-6;
  if (dtype == "f16") return 2e-3;
  return 1e-2;
}

/// SPEC §Precision bound on dq, dk and dv.
double spec_gradient_bound(const std::string& dtype) {
  if (dtype == "f64") return 1e-10;
  if (dtype == "f32") return 1e-5;
  if (dtype == "f16") return 5e-3;
  return 2e-2;
}

// ---- Options. Numbers are parsed here rather than by CLI11, which accepts "0x10" and " 4", saturates
// overflow and wraps "-1" into an unsigned seed.

template <class Int>
Int parse_integer(const std::string& option, const std::string& text, Int lo, Int hi) {
  Int v{};
  const char* end = text.data() + text.size();
  const auto [stop, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || stop != end || v < lo || v > hi) {
    throw usage_error(option + " = '" + text + "': expected an integer from " + std::to_string(lo) + " to " +
                      std::to_string(hi));
  }
  return v;
}

/// A finite number, >= 0 where `non_negative`.
double parse_real(const std::string& option, const std::string& text, bool non_negative) {
  double v = 0;
  const char* end = text.data() + text.size();
  const auto [stop, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || stop != end || !std::isfinite(v) || (non_negative && v < 0))
    throw usage_error(option + " = '" + text + "': expected a finite number" + (non_negative ? " >= 0" : ""));
  return v;
}

constexpr std::int64_t max_tokens = std::numeric_limits<std::int32_t>::max();  // cu_seqlens are int32

std::vector<std::int64_t> parse_seqlens(const std::string& text) {
  std::vector<std::int64_t> lens;
  std::int64_t total = 0;
  std::size_t start = 0;
  do {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, comma - start);
    try {
      lens.push_back(parse_integer<std::int64_t>("--seqlens", item, 0, max_tokens));
    } catch (const usage_error&) {
      throw usage_error("--seqlens = '" + text + "': item " + std::to_string(lens.size() + 1) + " ('" + item +
                        "') is not a length from 0 to " + std::to_string(max_tokens));
    }
    if ((total += lens.back()) > max_tokens)
      throw usage_error("--seqlens = '" + text + "' add up to more than 2^31 - 1 tokens");
    start = comma + 1;
  } while (start <= text.size());
  return lens;
}

/// The output folder without trailing slashes, so that OUT.tmp-PID sits beside it, not inside.
fs::path parse_out(const std::string& text) {
  if (text.empty()) throw usage_error("--out = '': expected a folder name");
  fs::path p = fs::path(text).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  if (p.empty() || p.filename() == "." || p.filename() == "..")
    throw usage_error("--out = '" + text + "' already exists; choose a new folder");
  return p;
}

/// a · b · …, refusing arrays past `max_elements` so that no size derived from the inputs overflows.
constexpr std::int64_t max_elements = 100'000'000'000;
std::int64_t elements(std::initializer_list<std::int64_t> dims, const std::string& what) {
  std::int64_t n = 1;
  for (auto d : dims) {
    if (__builtin_mul_overflow(n, d, &n) || n > max_elements)
      throw usage_error(what + " would hold more than " + std::to_string(max_elements) + " elements; too large");
  }
  return n;
}

// ---- The output folder. Results go to OUT.tmp-PID, which is renamed to OUT once everything is on disk.
// SIGINT, SIGTERM and SIGHUP are blocked in every thread (the CPU backend's workers inherit the mask)
// and taken by one watcher thread through sigwait, so the cleanup runs in ordinary code, not in a
// handler. The watcher takes stage_mutex, which each file write holds, so no file can be created
// after it removed the folder.

std::mutex stage_mutex;
class staging;
staging* active_stage = nullptr;  // guarded by stage_mutex

bool exists_or_link(const fs::path& p) { return fs::exists(fs::symlink_status(p)); }

/// rename(2) that never replaces `to`: plain rename would replace an empty folder created meanwhile.
int rename_noreplace(const fs::path& from, const fs::path& to) {
#ifdef RENAME_NOREPLACE
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return 0;
  if (errno != EINVAL && errno != ENOSYS) return -1;  // else a file system without the flag
#endif
  if (exists_or_link(to)) return errno = EEXIST, -1;
  return std::rename(from.c_str(), to.c_str());
}

class staging {
 public:
  explicit staging(const fs::path& out) : out_(out), tmp_(out.string() + ".tmp-" + std::to_string(::getpid())) {
    std::lock_guard lock(stage_mutex);
    try {
      if (exists_or_link(out_)) throw usage_error("--out " + out_.string() + " already exists; choose a new folder");
      remove_leftovers();
      std::vector<fs::path> missing;  // parents to create, innermost first; removed again on failure
      for (fs::path p = out_.parent_path(); !p.empty() && !exists_or_link(p); p = p.parent_path()) missing.push_back(p);
      active_stage = this;
      for (auto p = missing.rbegin(); p != missing.rend(); ++p)
        if (fs::create_directory(*p)) made_.push_back(*p);
      if (!fs::create_directory(tmp_))
        throw usage_error(tmp_.string() + " appeared meanwhile; is another moba-ref writing " + out_.string() + "?");
      have_tmp_ = true;
    } catch (...) {
      remove();
      active_stage = nullptr;
      throw;
    }
  }
  staging(const staging&) = delete;
  staging& operator=(const staging&) = delete;
  ~staging() {
    std::lock_guard lock(stage_mutex);
    if (!committed_) remove();
    active_stage = nullptr;
  }

  /// Calls write(path) for the file `name` of the folder, holding the lock against the watcher.
  template <class Write>
  void write(const std::string& name, Write&& write) {
    std::lock_guard lock(stage_mutex);
    write((tmp_ / name).string());
  }

  /// Renames the folder to --out; or, given `only`, that one file of it (plot's SVG), the folder then removed.
  void commit(const std::string& only = "") {
    std::lock_guard lock(stage_mutex);
    if (rename_noreplace(only.empty() ? tmp_ : tmp_ / only, out_) != 0) {
      const int err = errno;
      throw std::runtime_error(
          err == EEXIST || err == ENOTEMPTY
              ? "--out " + out_.string() + " was created by someone else while moba-ref ran; the results were not kept"
              : "cannot rename " + tmp_.string() + " to " + out_.string() + ": " + std::strerror(err));
    }
    committed_ = true;
    active_stage = nullptr;
    std::error_code ec;
    if (!only.empty()) fs::remove_all(tmp_, ec);  // what is left is a temporary folder at worst
  }

  /// Removes what this run made; stage_mutex is held. Never throws: it also runs on the way out of errors.
  void remove() noexcept {
    std::error_code ec;
    if (have_tmp_) fs::remove_all(tmp_, ec);
    for (auto p = made_.rbegin(); p != made_.rend(); ++p) fs::remove(*p, ec);  // only while still empty
    have_tmp_ = false;
    made_.clear();
  }

 private:
  /// OUT.tmp-PID folders of runs killed without a chance to clean up (SIGKILL, a crash): removed when
  /// their process is gone, reported when it still runs. Our own pid can only be an earlier run's.
  void remove_leftovers() {
    const fs::path parent = out_.parent_path().empty() ? fs::path(".") : out_.parent_path();
    if (!fs::is_directory(parent)) return;
    const std::string prefix = out_.filename().string() + ".tmp-";
    for (const auto& entry : fs::directory_iterator(parent)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(prefix, 0) != 0 || entry.symlink_status().type() != fs::file_type::directory) continue;
      const std::string digits = name.substr(prefix.size());
      pid_t pid = 0;
      const auto [stop, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), pid);
      if (ec != std::errc() || stop != digits.data() + digits.size() || pid <= 0) continue;
      if (pid == ::getpid() || (::kill(pid, 0) != 0 && errno == ESRCH)) {
        fs::remove_all(entry.path());
        std::fprintf(stderr, "moba-ref: removed %s, left by an interrupted run (process %d is gone)\n",
                     entry.path().c_str(), static_cast<int>(pid));
      } else {
        std::fprintf(stderr, "moba-ref: note: %s belongs to process %d, which still runs; left alone\n",
                     entry.path().c_str(), static_cast<int>(pid));
      }
    }
  }

  fs::path out_, tmp_;
  std::vector<fs::path> made_;  // parents created for tmp_, outermost first
  bool have_tmp_ = false, committed_ = false;
};

sigset_t watched_signals;  // set once, before the watcher starts

/// Waits for an interruption, removes the folder being written, then dies of the same signal (exit
/// status 128 + sig in a shell), holding stage_mutex to the end so no file is written after the removal.
void watch_signals() {
  int sig = 0;
  while (sigwait(&watched_signals, &sig) != 0) {
  }
  std::lock_guard lock(stage_mutex);
  if (active_stage) active_stage->remove();
  std::signal(sig, SIG_DFL);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
  raise(sig);
  _exit(128 + sig);
}

void install_signal_watcher() {
  std::signal(SIGXFSZ, SIG_IGN);  // past a file-size limit, write() then fails with EFBIG and is reported
  sigemptyset(&watched_signals);
  bool any = false;
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction now {};
    // One ignored by whoever started us (nohup, a background job) stays ignored.
    if (sigaction(sig, nullptr, &now) == 0 && now.sa_handler != SIG_IGN) any = true, sigaddset(&watched_signals, sig);
  }
  if (!any) return;
  pthread_sigmask(SIG_BLOCK, &watched_signals, nullptr);  // before any other thread exists, so all inherit it
  std::thread(watch_signals).detach();
}

// ---- Computing.

struct settings {
  std::int64_t q_heads = 1, kv_heads = 1, head_dim = 64;
  moba::config cfg;
  std::string dtype = "f32", backend = "reference", mode = "sparse";
  std::optional<double> scale;
  bool grad = false;  // also the backward, from inputs.dout
};

/// Inputs in dtype T, packed varlen; dout is empty unless gradients are wanted.
template <class T>
struct inputs {
  std::vector<T> q, k, v;
  std::vector<std::int32_t> cu_q, cu_k;
  std::vector<T> dout;
  std::int64_t total_q() const { return cu_q.back(); }
  std::int64_t total_k() const { return cu_k.back(); }
};

/// Runs one backend on `in`; returns out, lse and the selection, all written by the library.
template <class Backend, class T>
void run_backend(const settings& s, const inputs<T>& in, std::vector<T>& out, std::vector<moba::accum_t<T>>& lse,
                 std::vector<std::int32_t>& selected, std::int64_t width) {
  const std::int64_t tq = in.total_q(), tk = in.total_k(), hq = s.q_heads, hkv = s.kv_heads, d = s.head_dim;
  // The views below read exactly these many elements; callers checked the files, this keeps it so.
  if (in.q.size() != static_cast<std::size_t>(tq * hq * d) || in.k.size() != static_cast<std::size_t>(tk * hkv * d) ||
      in.v.size() != in.k.size())
    throw std::logic_error("moba-ref: the inputs do not match the views built on them");
  out.assign(elements({tq, hq, d}, "out.npy"), T{});
  lse.assign(elements({tq, hq}, "lse.npy"), 0);
  selected.assign(elements({tq, hq, width}, "selected.npy (--top-k " + std::to_string(width) + ")"), -1);
  moba::attention<Backend, T> attn(s.cfg);
  attn.forward({.q = moba::packed(in.q.data(), tq, hq, d),
                .k = moba::packed(in.k.data(), tk, hkv, d),
                .v = moba::packed(in.v.data(), tk, hkv, d),
                .out = moba::packed(out.data(), tq, hq, d),
                .lse = moba::bsh(lse.data(), 1, tq, hq),
                .selected = moba::selection(selected.data(), 1, tq, hq, width),
                .cu_seqlens_q = in.cu_q,
                .cu_seqlens_k = in.cu_k});
}

template <class T>
struct gradients {
  std::vector<T> dq, dk, dv;
};

/// The backward of one backend from its own forward's out, lse and selection (held fixed, SPEC §Backward).
template <class Backend, class T>
void backward_backend(const settings& s, const inputs<T>& in, const std::vector<T>& out,
                      const std::vector<moba::accum_t<T>>& lse, const std::vector<std::int32_t>& selected,
                      std::int64_t width, gradients<T>& g) {
  const std::int64_t tq = in.total_q(), tk = in.total_k(), hq = s.q_heads, hkv = s.kv_heads, d = s.head_dim;
  if (in.dout.size() != in.q.size()) throw std::logic_error("moba-ref: dout does not match q");
  g.dq.assign(in.q.size(), T{});
  g.dk.assign(in.k.size(), T{});
  g.dv.assign(in.v.size(), T{});
  moba::attention<Backend, T> attn(s.cfg);
  attn.backward({.q = moba::packed(in.q.data(), tq, hq, d),
                 .k = moba::packed(in.k.data(), tk, hkv, d),
                 .v = moba::packed(in.v.data(), tk, hkv, d),
                 .out = moba::packed(out.data(), tq, hq, d),
                 .dout = moba::packed(in.dout.data(), tq, hq, d),
                 .lse = moba::bsh(lse.data(), 1, tq, hq),
                 .dq = moba::packed(g.dq.data(), tq, hq, d),
                 .dk = moba::packed(g.dk.data(), tk, hkv, d),
                 .dv = moba::packed(g.dv.data(), tk, hkv, d),
                 .cu_seqlens_q = in.cu_q,
                 .cu_seqlens_k = in.cu_k,
                 .selection = moba::selection(selected.data(), 1, tq, hq, width)});
}

/// Forward (and backward when in.dout is given) on the backend named by --backend.
template <class T>
void run_named_backend(const settings& s, const inputs<T>& in, std::vector<T>& out, std::vector<moba::accum_t<T>>& lse,
                       std::vector<std::int32_t>& selected, std::int64_t width, gradients<T>& g) {
  const auto both = [&]<class Backend>() {
    run_backend<Backend, T>(s, in, out, lse, selected, width);
    if (s.grad) backward_backend<Backend, T>(s, in, out, lse, selected, width, g);
  };
  if (s.backend == "reference") return both.template operator()<moba::reference>();
#if __has_include(<moba/backends/cpu/forward.hpp>)
  if (s.backend == "cpu") return both.template operator()<moba::cpu>();
#endif
  throw usage_error("moba-ref was built without the " + s.backend + " backend; use --backend reference");
}

/// Computes everything and writes it into the staging folder.
template <class T>
void compute_and_write(const settings& s, const inputs<T>& in, staging& stage, json meta, bool write_inputs) {
  std::int64_t max_k = 0;
  for (std::size_t b = 0; b + 1 < in.cu_k.size(); ++b)
    max_k = std::max<std::int64_t>(max_k, in.cu_k[b + 1] - in.cu_k[b]);
  const std::int64_t width = s.cfg.mode == moba::mode::full
                                 ? std::max<std::int64_t>(1, moba::core::block_count(max_k, s.cfg.block_size))
                                 : s.cfg.top_k;
  std::vector<T> out;
  std::vector<moba::accum_t<T>> lse;
  std::vector<std::int32_t> selected;
  gradients<T> g;
  run_named_backend<T>(s, in, out, lse, selected, width, g);

  // The float64 result on the same (already rounded) inputs: its own forward, then its backward
  // from that forward, as a float64 kernel would compute them.
  inputs<double> wide{{}, {}, {}, in.cu_q, in.cu_k, {}};
  for (auto [from, to] : {std::pair{&in.q, &wide.q}, {&in.k, &wide.k}, {&in.v, &wide.v}, {&in.dout, &wide.dout}})
    for (const T& x : *from) to->push_back(moba::to_double(x));
  std::vector<double> out64, lse64;
  std::vector<std::int32_t> selected64;
  gradients<double> g64;
  run_named_backend<double>(s, wide, out64, lse64, selected64, width, g64);

  const std::int64_t tq = in.total_q(), tk = in.total_k(), hq = s.q_heads, hkv = s.kv_heads, d = s.head_dim;
  auto put = [&stage]<class E>(const std::string& name, const std::string& descr, std::vector<std::int64_t> shape,
                               const std::vector<E>& x) {
    stage.write(name, [&](const std::string& path) { npy::write(path, descr, shape, x.data(), x.size() * sizeof(E)); });
  };
  const auto cu_len = [](const std::vector<std::int32_t>& cu) { return static_cast<std::int64_t>(cu.size()); };
  if (write_inputs) {
    put("q.npy", npy_descr<T>(), {tq, hq, d}, in.q);
    put("k.npy", npy_descr<T>(), {tk, hkv, d}, in.k);
    put("v.npy", npy_descr<T>(), {tk, hkv, d}, in.v);
    put("cu_seqlens.npy", "<i4", {cu_len(in.cu_q)}, in.cu_q);
    if (in.cu_k != in.cu_q) put("cu_seqlens_k.npy", "<i4", {cu_len(in.cu_k)}, in.cu_k);
  }
  put("out.npy", npy_descr<T>(), {tq, hq, d}, out);
  put("out_f64.npy", "<f8", {tq, hq, d}, out64);
  put("lse.npy", npy_descr<moba::accum_t<T>>(), {tq, hq}, lse);
  put("lse_f64.npy", "<f8", {tq, hq}, lse64);
  put("selected.npy", "<i4", {tq, hq, width}, selected);
  if (s.grad) {
    if (write_inputs) put("dout.npy", npy_descr<T>(), {tq, hq, d}, in.dout);
    put("dq.npy", npy_descr<T>(), {tq, hq, d}, g.dq);
    put("dk.npy", npy_descr<T>(), {tk, hkv, d}, g.dk);
    put("dv.npy", npy_descr<T>(), {tk, hkv, d}, g.dv);
    put("dq_f64.npy", "<f8", {tq, hq, d}, g64.dq);
    put("dk_f64.npy", "<f8", {tk, hkv, d}, g64.dk);
    put("dv_f64.npy", "<f8", {tk, hkv, d}, g64.dv);
  }

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
  meta["grad"] = s.grad;
  meta["moba_version"] = moba::version_string;
  meta["bf16_storage"] = "bfloat16 arrays are stored as <u2 bit patterns";
  const std::string text = meta.dump(2) + '\n';
  stage.write("meta.json", [&](const std::string& path) { npy::write_file(path, {text}); });
}

/// npy::read, its message prefixed with the option that named the file.
npy::array read_npy(const std::string& option, const std::string& path) {
  try {
    return npy::read(path);
  } catch (const npy::error& e) {
    throw usage_error(option + ": " + e.what());
  }
}

template <class T>
std::vector<T> convert_input(const npy::array& a) {
  std::vector<T> x(static_cast<std::size_t>(a.count()));
  if (a.descr == npy_descr<T>()) {
    if (!x.empty()) std::memcpy(x.data(), a.data.data(), a.data.size());  // empty vectors may hold null
  } else {  // <f8 (check_float_input allows no other)
    for (std::size_t i = 0; i < x.size(); ++i) {
      double v;
      std::memcpy(&v, a.data.data() + 8 * i, sizeof v);
      x[i] = moba::from_double<T>(v);
    }
  }
  return x;
}

/// q, k or v: [tokens, heads >= 1, dim >= 1] of the compute dtype or <f8.
void check_float_input(const npy::array& a, const std::string& option, const std::string& path,
                       const std::string& dtype) {
  const std::string file = option + " " + path;
  if (a.shape.size() != 3)
    throw usage_error(file + " has shape " + npy::dims(a.shape) + "; it must be [tokens, heads, dim]");
  if (a.shape[1] < 1 || a.shape[2] < 1)
    throw usage_error(file + " has shape " + npy::dims(a.shape) + "; heads and dim must be >= 1");
  if (a.descr != descr_of(dtype) && a.descr != "<f8")
    throw usage_error(file + " has dtype " + a.descr + " but --dtype " + dtype + " needs " + descr_of(dtype) +
                      " (or <f8, converted)");
}

std::vector<std::int32_t> read_cu_seqlens(const std::string& option, const std::string& path) {
  const npy::array a = read_npy(option, path);
  const std::string file = option + " " + path;
  if (a.shape.size() != 1 || a.shape[0] < 1)
    throw usage_error(file + " has shape " + npy::dims(a.shape) + "; it must be [batch + 1], batch >= 0");
  if (a.descr != "<i4" && a.descr != "<i8")
    throw usage_error(file + " has dtype " + a.descr + "; cu_seqlens must be <i4 or <i8");
  std::vector<std::int32_t> cu(a.count());
  for (std::size_t i = 0; i < cu.size(); ++i) {
    std::int64_t v;
    if (a.descr == "<i4") {
      std::int32_t w;
      std::memcpy(&w, a.data.data() + 4 * i, 4);
      v = w;
    } else {
      std::memcpy(&v, a.data.data() + 8 * i, 8);
    }
    if (v < 0 || v > max_tokens)
      throw usage_error(file + ": [" + std::to_string(i) + "] = " + std::to_string(v) + " is out of range");
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
  std::vector<std::int32_t> cu{0};
  for (auto len : seqlens) cu.push_back(static_cast<std::int32_t>(cu.back() + len));  // parse_seqlens bounded the sum
  for (auto [heads, what] : {std::pair{s.q_heads, "q.npy"}, {s.kv_heads, "k.npy"}})
    elements({cu.back(), heads, s.head_dim}, what);
  staging stage(out);
  with_dtype(s.dtype, [&]<class T>() {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    inputs<T> in;
    in.cu_q = in.cu_k = cu;
    // Drawn in double in the order q, k, v (then dout, so that --grad leaves q, k, v as they were),
    // then rounded once to T.
    for (auto [x, heads] : {std::pair{&in.q, s.q_heads}, {&in.k, s.kv_heads}, {&in.v, s.kv_heads}}) {
      x->resize(cu.back() * heads * s.head_dim);
      for (auto& e : *x) e = moba::from_double<T>(normal(rng));
    }
    if (s.grad) {
      in.dout.resize(in.q.size());
      for (auto& e : in.dout) e = moba::from_double<T>(normal(rng));
    }
    json meta{{"command", "generate"}, {"seed", seed}, {"seqlens", seqlens}};
    compute_and_write<T>(s, in, stage, meta, true);
  });
  stage.commit();
}

void run(settings s, const std::string& q_path, const std::string& k_path, const std::string& v_path,
         const std::string& cu_path, const std::string& cu_k_path, const std::string& dout_path, const fs::path& out) {
  apply_mode(s);
  // Everything is read and checked before the output folder is made.
  const npy::array q = read_npy("--q", q_path), k = read_npy("--k", k_path), v = read_npy("--v", v_path);
  if (s.dtype.empty()) s.dtype = dtype_of(q.descr);  // q's dtype unless --dtype says otherwise
  if (s.dtype.empty())
    throw usage_error("--q " + q_path + " has dtype " + q.descr + "; expected floats (<f8, <f4, <f2, or <u2 for bf16)");
  check_float_input(q, "--q", q_path, s.dtype);
  check_float_input(k, "--k", k_path, s.dtype);
  check_float_input(v, "--v", v_path, s.dtype);
  if (k.shape[2] != q.shape[2])
    throw usage_error("--k " + k_path + " has shape " + npy::dims(k.shape) + " but --q " + q_path + " has " +
                      npy::dims(q.shape) + "; their head dims (" + std::to_string(k.shape[2]) + ", " +
                      std::to_string(q.shape[2]) + ") differ");
  if (v.shape != k.shape)
    throw usage_error("--v " + v_path + " has shape " + npy::dims(v.shape) + " but --k " + k_path + " has " +
                      npy::dims(k.shape) + "; they must match");
  const std::vector<std::int32_t> cu_q = read_cu_seqlens("--cu-seqlens", cu_path);
  const std::vector<std::int32_t> cu_k = cu_k_path.empty() ? cu_q : read_cu_seqlens("--cu-seqlens-k", cu_k_path);
  if (cu_k.size() != cu_q.size())
    throw usage_error("--cu-seqlens " + cu_path + " has " + std::to_string(cu_q.size()) +
                      " entries but --cu-seqlens-k " + cu_k_path + " has " + std::to_string(cu_k.size()));
  const auto check_tokens = [](const std::vector<std::int32_t>& offsets, const std::string& offsets_file,
                               const npy::array& a, const std::string& file) {
    if (offsets.back() != a.shape[0])
      throw usage_error(offsets_file + " ends at " + std::to_string(offsets.back()) + " but " + file + " has shape " +
                        npy::dims(a.shape) + " (" + std::to_string(a.shape[0]) + " tokens)");
  };
  check_tokens(cu_q, "--cu-seqlens " + cu_path, q, "--q " + q_path);
  check_tokens(cu_k, cu_k_path.empty() ? "--cu-seqlens " + cu_path : "--cu-seqlens-k " + cu_k_path, k, "--k " + k_path);
  npy::array dout;
  if (!dout_path.empty()) {
    dout = read_npy("--dout", dout_path);
    check_float_input(dout, "--dout", dout_path, s.dtype);
    if (dout.shape != q.shape)
      throw usage_error("--dout " + dout_path + " has shape " + npy::dims(dout.shape) + " but --q " + q_path + " has " +
                        npy::dims(q.shape) + "; they must match");
    s.grad = true;
  }
  s.q_heads = q.shape[1];
  s.kv_heads = k.shape[1];
  s.head_dim = q.shape[2];
  staging stage(out);
  with_dtype(s.dtype, [&]<class T>() {
    inputs<T> in{convert_input<T>(q), convert_input<T>(k), convert_input<T>(v), cu_q, cu_k,
                 s.grad ? convert_input<T>(dout) : std::vector<T>{}};
    json meta{{"command", "run"}, {"inputs", {q_path, k_path, v_path, cu_path, cu_k_path, dout_path}}};
    compute_and_write<T>(s, in, stage, meta, false);
  });
  stage.commit();
}

std::vector<double> as_doubles(const npy::array& a, const std::string& name) {
  std::vector<double> x(static_cast<std::size_t>(a.count()));
  if (dtype_of(a.descr).empty())
    throw usage_error(name + " has dtype " + a.descr + "; expected floats (<f8, <f4, <f2, or <u2 for bf16)");
  for (std::size_t i = 0; i < x.size(); ++i) {
    const char* p = a.data.data() + i * npy::item_size(a.descr);
    if (a.descr == "<f8") {
      std::memcpy(&x[i], p, 8);
    } else if (a.descr == "<f4") {
      float f;
      std::memcpy(&f, p, 4);
      x[i] = f;
    } else {
      std::uint16_t bits;
      std::memcpy(&bits, p, 2);
      x[i] = a.descr == "<f2" ? static_cast<double>(moba::float16::from_bits(bits))
                              : static_cast<double>(moba::bfloat16::from_bits(bits));
    }
  }
  return x;
}

/// What check needs from DIR/meta.json, every field checked for type and range.
struct expected_meta {
  std::string dtype;
  std::int64_t tokens = 0, q_heads = 0, head_dim = 0;
  std::int64_t tokens_k = 0, kv_heads = 0;  // read for dk and dv only
};

expected_meta read_meta(const fs::path& path, bool keys) {
  std::ifstream file(path);
  if (!file) throw usage_error("--expected: cannot read " + path.string());
  try {
    const json meta = json::parse(file);
    const auto integer = [&](const json& v, const std::string& key, std::int64_t lo) {
      if (!v.is_number_integer() || v.get<std::int64_t>() < lo || v.get<std::int64_t>() > max_tokens)
        throw usage_error(path.string() + ": " + key + " = " + v.dump() + " is not an integer from " +
                          std::to_string(lo) + " to " + std::to_string(max_tokens));
      return v.get<std::int64_t>();
    };
    expected_meta m;
    const json& dtype = meta.at("dtype");
    if (!dtype.is_string() || dtype_of(descr_of(dtype.get<std::string>())) != dtype.get<std::string>())
      throw usage_error(path.string() + ": dtype = " + dtype.dump() + " is not \"f64\", \"f32\", \"f16\" or \"bf16\"");
    m.dtype = dtype.get<std::string>();
    m.q_heads = integer(meta.at("q_heads"), "q_heads", 1);
    m.head_dim = integer(meta.at("head_dim"), "head_dim", 1);
    const json& cu = meta.at("cu_seqlens_q");
    if (!cu.is_array() || cu.empty()) throw usage_error(path.string() + ": cu_seqlens_q is not a non-empty list");
    m.tokens = integer(cu.back(), "cu_seqlens_q[-1]", 0);
    if (keys) {
      m.kv_heads = integer(meta.at("kv_heads"), "kv_heads", 1);
      const json& cu_k = meta.at("cu_seqlens_k");
      if (!cu_k.is_array() || cu_k.empty()) throw usage_error(path.string() + ": cu_seqlens_k is not a non-empty list");
      m.tokens_k = integer(cu_k.back(), "cu_seqlens_k[-1]", 0);
    }
    return m;
  } catch (const json::exception& e) {
    throw usage_error(path.string() + ": " + e.what());
  }
}

int check(const fs::path& expected_dir, const std::string& actual_path, const std::string& what,
          std::optional<double> tol) {
  const bool keys = what == "dk" || what == "dv", gradient = keys || what == "dq";
  const expected_meta meta = read_meta(expected_dir / "meta.json", keys);
  const std::string expected_path = (expected_dir / (what + "_f64.npy")).string();
  if (gradient && !exists_or_link(expected_path))
    throw usage_error("--expected " + expected_dir.string() + " has no " + what +
                      "_f64.npy; write the gradients with generate --grad (or run --dout)");
  const npy::array expected_npy = read_npy("--expected", expected_path);
  std::vector<std::int64_t> want{meta.tokens, meta.q_heads, meta.head_dim};
  if (keys) want = {meta.tokens_k, meta.kv_heads, meta.head_dim};
  if (what == "lse") want.pop_back();
  if (expected_npy.shape != want || expected_npy.descr != "<f8")
    throw usage_error(expected_path + " has shape " + npy::dims(expected_npy.shape) + " and dtype " +
                      expected_npy.descr + " but its meta.json says " + npy::dims(want) + " and <f8");
  const npy::array actual_npy = read_npy("--actual", actual_path);
  if (actual_npy.shape != expected_npy.shape) {
    throw usage_error(actual_path + " has shape " + npy::dims(actual_npy.shape) + " but the expected " + what +
                      " has " + npy::dims(expected_npy.shape));
  }
  const std::vector<double> e = as_doubles(expected_npy, expected_path), a = as_doubles(actual_npy, actual_path);
  double num = 0, den = 0, worst = -1;
  std::size_t at = 0;
  for (std::size_t i = 0; i < e.size(); ++i) {
    // A corrupt reference must not be blamed on the kernel under test.
    if (!std::isfinite(e[i]))
      throw usage_error(expected_path + " holds " + std::to_string(e[i]) + " at element " + std::to_string(i));
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
  const double bound = tol ? *tol : gradient ? spec_gradient_bound(meta.dtype) : spec_bound(meta.dtype);
  std::printf("%s: relative error %.3e (tolerance %.1e, %s)\n", what.c_str(), rel, bound,
              tol ? "--tol" : ("SPEC bound for " + meta.dtype).c_str());
  if (e.empty()) {
    std::printf("no elements to compare\n");
  } else {  // e is not empty, so heads and dim are >= 1 (read_meta checked them)
    const bool has_dim = what != "lse";
    const std::int64_t heads = keys ? meta.kv_heads : meta.q_heads, dim = has_dim ? meta.head_dim : 1,
                       i = static_cast<std::int64_t>(at);
    std::printf("largest absolute error %.3e at %stoken %lld, %shead %lld", worst, keys ? "key " : "",
                static_cast<long long>(i / (heads * dim)), keys ? "kv " : "", static_cast<long long>(i / dim % heads));
    if (has_dim) std::printf(", dim %lld", static_cast<long long>(i % dim));
    std::printf(" (actual %.9g, expected %.9g)\n", a[at], e[at]);
  }
  const bool pass = rel <= bound;
  std::printf("%s\n", pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}

// ---- stats and plot: what the gate chose, from a generate/run folder or a bare selected.npy.

/// A selection checked row by row, with what is known about its queries. From a folder, meta.json
/// gives each token's position and the sequences; a bare selected.npy is one run of rows whose
/// current block is each row's largest entry (SPEC §Blocks 5: the current block is the last).
struct selection_info {
  std::string source;  // the file, for messages
  std::vector<std::int32_t> sel;  // [tokens, heads, width]
  std::int64_t tokens = 0, heads = 0, width = 0, blocks = 0;  // blocks: the key blocks on the x axis
  std::vector<std::int64_t> current, pos;  // per token; pos only with meta.json
  std::vector<std::int32_t> cu_q, cu_k;    // the sequences ({0, tokens} for a bare file)
  bool have_meta = false;
  std::int64_t block_size = 0, top_k = 0, kv_heads = 0, head_dim = 0;
  std::string dtype, mode;
  fs::path folder;
};

std::vector<std::int32_t> meta_offsets(const json& meta, const std::string& key, const std::string& file) {
  const json& cu = meta.at(key);
  if (!cu.is_array() || cu.empty() || cu[0] != 0)
    throw usage_error(file + ": " + key + " is not a list of offsets starting at 0");
  std::vector<std::int32_t> out;
  for (const json& v : cu) {
    if (!v.is_number_integer() || v.get<std::int64_t>() < (out.empty() ? 0 : out.back()) ||
        v.get<std::int64_t>() > max_tokens)
      throw usage_error(file + ": " + key + " holds " + v.dump() + ", not a non-decreasing offset");
    out.push_back(v.get<std::int32_t>());
  }
  return out;
}

selection_info load_selection(const std::string& from) {
  selection_info s;
  const bool folder = fs::is_directory(from);
  s.source = folder ? (fs::path(from) / "selected.npy").string() : from;
  if (folder) {
    s.folder = from;
    const std::string file = (s.folder / "meta.json").string();
    std::ifstream in(file);
    if (!in) throw usage_error("--from: cannot read " + file);
    try {
      const json meta = json::parse(in);
      const auto integer = [&](const std::string& key, std::int64_t lo) {
        const json& v = meta.at(key);
        if (!v.is_number_integer() || v.get<std::int64_t>() < lo || v.get<std::int64_t>() > max_tokens)
          throw usage_error(file + ": " + key + " = " + v.dump() + " is not an integer from " + std::to_string(lo) +
                            " to " + std::to_string(max_tokens));
        return v.get<std::int64_t>();
      };
      s.block_size = integer("block_size", 1);
      s.top_k = integer("top_k", 1);
      s.heads = integer("q_heads", 1);  // checked against the file below
      s.kv_heads = integer("kv_heads", 1);
      s.head_dim = integer("head_dim", 1);
      const json &dtype = meta.at("dtype"), &mode = meta.at("mode");
      if (!dtype.is_string() || dtype_of(descr_of(dtype.get<std::string>())) != dtype.get<std::string>())
        throw usage_error(file + ": dtype = " + dtype.dump() + " is not \"f64\", \"f32\", \"f16\" or \"bf16\"");
      if (mode != "sparse" && mode != "full") throw usage_error(file + ": mode = " + mode.dump() + " is not sparse or full");
      s.dtype = dtype.get<std::string>();
      s.mode = mode.get<std::string>();
      s.cu_q = meta_offsets(meta, "cu_seqlens_q", file);
      s.cu_k = meta_offsets(meta, "cu_seqlens_k", file);
    } catch (const json::exception& e) {
      throw usage_error(file + ": " + e.what());
    }
    if (s.cu_q.size() != s.cu_k.size())
      throw usage_error(file + ": cu_seqlens_q and cu_seqlens_k have different lengths");
    s.have_meta = true;
  }
  const npy::array a = read_npy("--from", s.source);
  if (a.descr != "<i4" || a.shape.size() != 3 || a.shape[1] < 1 || a.shape[2] < 1)
    throw usage_error(s.source + " has shape " + npy::dims(a.shape) + " and dtype " + a.descr +
                      "; a selection is [tokens, heads >= 1, width >= 1] of <i4");
  if (s.have_meta && a.shape[1] != s.heads)
    throw usage_error(s.source + " has shape " + npy::dims(a.shape) + " but meta.json says q_heads = " +
                      std::to_string(s.heads));
  s.tokens = a.shape[0], s.heads = a.shape[1], s.width = a.shape[2];
  s.sel.resize(static_cast<std::size_t>(a.count()));
  if (!s.sel.empty()) std::memcpy(s.sel.data(), a.data.data(), a.data.size());
  if (!s.have_meta) s.cu_q = s.cu_k = {0, static_cast<std::int32_t>(std::min(s.tokens, max_tokens))};
  if (s.cu_q.back() != s.tokens)
    throw usage_error(s.source + " has shape " + npy::dims(a.shape) + " but meta.json's cu_seqlens_q ends at " +
                      std::to_string(s.cu_q.back()));
  s.current.assign(s.tokens, 0);
  if (s.have_meta) s.pos.assign(s.tokens, 0);
  for (std::size_t b = 0; b + 1 < s.cu_q.size(); ++b) {
    const std::int64_t q_len = s.cu_q[b + 1] - s.cu_q[b], k_len = s.cu_k[b + 1] - s.cu_k[b];
    if (s.have_meta && q_len > k_len)
      throw usage_error(s.folder.string() + "/meta.json: sequence " + std::to_string(b) + " has more queries than keys");
    if (s.have_meta) s.blocks = std::max(s.blocks, moba::core::block_count(k_len, s.block_size));
    for (std::int64_t i = 0; i < q_len; ++i) {
      const std::int64_t t = s.cu_q[b] + i;
      for (std::int64_t h = 0; h < s.heads; ++h) {
        const std::int32_t* row = s.sel.data() + (t * s.heads + h) * s.width;
        std::int64_t n = 0;
        while (n < s.width && row[n] >= 0 && (n == 0 || row[n] > row[n - 1])) ++n;
        bool ok = n > 0 && std::all_of(row + n, row + s.width, [](std::int32_t x) { return x == -1; });
        std::int64_t c = ok ? row[n - 1] : -1;
        if (s.have_meta) {
          s.pos[t] = k_len - q_len + i;
          ok = ok && c == s.pos[t] / s.block_size;
          c = s.pos[t] / s.block_size;
        } else if (h > 0) {
          ok = ok && c == s.current[t];  // every head of a token has the same current block
        }
        if (!ok) {
          std::string entries;
          for (std::int64_t w = 0; w < s.width; ++w) entries += (w ? ", " : "") + std::to_string(row[w]);
          throw usage_error(s.source + ": token " + std::to_string(t) + ", head " + std::to_string(h) + " holds [" +
                            entries + "]; expected ascending blocks ending at its current block" +
                            (s.have_meta ? " " + std::to_string(c) : "") + ", then -1");
        }
        s.current[t] = c;
        s.blocks = std::max(s.blocks, c + 1);
      }
    }
  }
  return s;
}

/// "12.34%"; a share of nothing is 0.
std::string percent(std::int64_t part, std::int64_t whole) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f%%", whole ? 100.0 * static_cast<double>(part) / static_cast<double>(whole) : 0.0);
  return text;
}

/// Rows whose (K−1)-th and K-th best history scores (the K-th and (K+1)-th blocks counting the
/// current one) are within the gate's rounding, as the tests' near-tie rule (SPEC §Precision):
/// there a kernel with other rounding may choose differently. Scores in double from the stored inputs.
void print_near_ties(const selection_info& s) {
  const std::string q_path = (s.folder / "q.npy").string(), k_path = (s.folder / "k.npy").string();
  if (!s.have_meta || !exists_or_link(q_path) || !exists_or_link(k_path)) {
    std::printf("near-ties: not computed (needs q.npy and k.npy beside meta.json, as generate writes them)\n");
    return;
  }
  if (s.mode == "full") {
    std::printf("near-ties: none possible (full mode selects every block)\n");
    return;
  }
  const npy::array qa = read_npy("--from", q_path), ka = read_npy("--from", k_path);
  for (auto [a, path, tokens, heads] : {std::tuple{&qa, q_path, s.tokens, s.heads}, {&ka, k_path, std::int64_t{s.cu_k.back()}, s.kv_heads}}) {
    const std::vector<std::int64_t> want{tokens, heads, s.head_dim};
    if (a->shape != want || a->descr != descr_of(s.dtype))
      throw usage_error(path + " has shape " + npy::dims(a->shape) + " and dtype " + a->descr + " but meta.json says " +
                        npy::dims(want) + " and " + descr_of(s.dtype));
  }
  if (s.heads % s.kv_heads != 0) throw usage_error(s.folder.string() + "/meta.json: q heads not a multiple of kv_heads");
  const std::vector<double> q = as_doubles(qa, q_path), k = as_doubles(ka, k_path);
  const double eps = s.dtype == "f64" ? 1.1e-16 : 6e-8;  // the gate's arithmetic: fp64 for double, else fp32
  const std::int64_t d = s.head_dim, group = s.heads / s.kv_heads, need = s.top_k - 1;
  std::int64_t rows = 0, ties = 0;
  std::vector<double> kbar;
  std::vector<std::pair<double, std::int64_t>> scored;  // (score, block), best first after partial_sort
  for (std::size_t b = 0; b + 1 < s.cu_q.size(); ++b) {
    const std::int64_t k_len = s.cu_k[b + 1] - s.cu_k[b], nb = moba::core::block_count(k_len, s.block_size);
    for (std::int64_t kh = 0; kh < s.kv_heads; ++kh) {
      kbar.assign(nb * d, 0);
      for (std::int64_t x = 0; x < k_len; ++x)
        for (std::int64_t e = 0; e < d; ++e) kbar[x / s.block_size * d + e] += k[((s.cu_k[b] + x) * s.kv_heads + kh) * d + e];
      for (std::int64_t j = 0; j < nb; ++j)
        for (std::int64_t e = 0; e < d; ++e)
          kbar[j * d + e] /= static_cast<double>(std::min(k_len, (j + 1) * s.block_size) - j * s.block_size);
      for (std::int64_t t = s.cu_q[b]; t < s.cu_q[b + 1]; ++t) {
        const std::int64_t c = s.current[t];
        if (need < 1 || c <= need) continue;  // the gate had no choice: every eligible block is taken
        for (std::int64_t h = kh * group; h < (kh + 1) * group; ++h) {
          const double* qi = q.data() + (t * s.heads + h) * d;
          scored.clear();
          std::vector<double> magnitude(c);
          for (std::int64_t j = 0; j < c; ++j) {
            double dot = 0, mag = 0;
            for (std::int64_t e = 0; e < d; ++e) dot += qi[e] * kbar[j * d + e], mag += std::abs(qi[e] * kbar[j * d + e]);
            scored.emplace_back(dot, j);
            magnitude[j] = mag;
          }
          std::partial_sort(scored.begin(), scored.begin() + need + 1, scored.end(), [](const auto& x, const auto& y) {
            return moba::core::ranks_before(x.first, x.second, y.first, y.second);
          });
          const auto [s1, j1] = scored[need - 1];
          const auto [s2, j2] = scored[need];
          ++rows;
          if (std::abs(s1 - s2) <= 4.0 * static_cast<double>(d + 2) * eps * std::max(magnitude[j1], magnitude[j2])) ++ties;
        }
      }
    }
  }
  std::printf("near-ties: %lld of %lld rows with a choice (%s) have their K-th and (K+1)-th gate scores within %s rounding\n",
              static_cast<long long>(ties), static_cast<long long>(rows), percent(ties, rows).c_str(),
              s.dtype == "f64" ? "fp64" : "fp32");
}

void stats(const std::string& from) {
  const selection_info s = load_selection(from);
  std::vector<std::int64_t> as_current(s.blocks + 1, 0), as_history(s.blocks + 1, 0), eligible(s.blocks + 1, 0);
  std::int64_t attended = 0, reach = 0, pairs = 0, causal_pairs = 0;
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    const std::int64_t c = s.current[t];
    eligible[0] += s.heads;  // a difference array: rows for which blocks [0, c) are history
    eligible[c] -= s.heads;
    reach += (c + 1) * s.heads;
    for (std::int64_t h = 0; h < s.heads; ++h) {
      std::int64_t n = 0;
      for (std::int64_t w = 0; w < s.width; ++w) {
        const std::int32_t j = s.sel[(t * s.heads + h) * s.width + w];
        if (j < 0) break;
        ++(j == c ? as_current : as_history)[j];
        ++n;
      }
      attended += n;
      if (s.have_meta) {  // history blocks lie wholly in the past: block_size keys each
        pairs += s.pos[t] - c * s.block_size + 1 + (n - 1) * s.block_size;
        causal_pairs += s.pos[t] + 1;
      }
    }
  }
  for (std::int64_t j = 1; j <= s.blocks; ++j) eligible[j] += eligible[j - 1];

  std::printf("selection %s: %lld tokens x %lld heads = %lld rows, width %lld", s.source.c_str(),
              static_cast<long long>(s.tokens), static_cast<long long>(s.heads), static_cast<long long>(s.tokens * s.heads),
              static_cast<long long>(s.width));
  if (s.have_meta)
    std::printf(" (block size %lld, top-k %lld, %s, %lld sequences)", static_cast<long long>(s.block_size),
                static_cast<long long>(s.top_k), s.mode.c_str(), static_cast<long long>(s.cu_q.size() - 1));
  std::printf("\nattended blocks: %lld of %lld in causal reach (%s)\n", static_cast<long long>(attended),
              static_cast<long long>(reach), percent(attended, reach).c_str());
  if (s.have_meta)
    std::printf("attended key pairs: %lld of %lld causal pairs (%s)\n", static_cast<long long>(pairs),
                static_cast<long long>(causal_pairs), percent(pairs, causal_pairs).c_str());
  else
    std::printf("attended key pairs: not computed (a bare selected.npy has no positions; give its folder)\n");
  print_near_ties(s);
  std::printf("load per key block, in rows (token x head): as the current block, as a chosen history block, and\n"
              "rows for which it is history (share: chosen / those):\n");
  std::printf("%7s %9s %9s %9s %8s\n", "block", "current", "history", "eligible", "share");
  double max_share = 0, sum_share = 0;
  std::int64_t counted = 0;
  for (std::int64_t j = 0; j < s.blocks; ++j) {
    std::printf("%7lld %9lld %9lld %9lld %8s\n", static_cast<long long>(j), static_cast<long long>(as_current[j]),
                static_cast<long long>(as_history[j]), static_cast<long long>(eligible[j]),
                eligible[j] ? percent(as_history[j], eligible[j]).c_str() : "-");
    if (eligible[j]) {
      const double share = static_cast<double>(as_history[j]) / static_cast<double>(eligible[j]);
      max_share = std::max(max_share, share), sum_share += share, ++counted;
    }
  }
  if (counted && sum_share > 0)
    std::printf("history load imbalance (largest share / mean share, as MoE expert load): %.3f\n",
                max_share / (sum_share / static_cast<double>(counted)));
}

std::string xml_escape(const std::string& text) {
  std::string out;
  for (char ch : text) {
    if (ch == '&') out += "&amp;";
    else if (ch == '<') out += "&lt;";
    else if (ch == '>') out += "&gt;";
    else if (ch == '"') out += "&quot;";
    else out += ch;
  }
  return out;
}

/// A tick step of 1, 2 or 5 × 10^n that puts at most about `ticks` ticks on `extent` units.
std::int64_t tick_step(std::int64_t extent, std::int64_t ticks) {
  for (std::int64_t base = 1;; base *= 10)
    for (std::int64_t f : {1, 2, 5})
      if (extent <= ticks * base * f) return base * f;
}

/// printf into a string, for the SVG.
template <class... Args>
std::string fmt(const char* format, Args... args) {
  const int n = std::snprintf(nullptr, 0, format, args...);
  std::string out(static_cast<std::size_t>(n) + 1, '\0');
  std::snprintf(out.data(), out.size(), format, args...);
  out.pop_back();
  return out;
}

/// The map: x = key block, y = query token (packed; rows of up to `bin` tokens, never straddling two
/// sequences), each cell shaded by the share of the row's (token, head) pairs that chose the block
/// (opacity = share), the current block of each row traced in red, sequences parted by dashed lines.
std::string selection_svg(const selection_info& s, std::optional<std::int64_t> head, std::int64_t max_rows) {
  constexpr double left = 80, top = 50, pw = 720, ph = 560, legend = 250, bottom = 60;
  const std::int64_t blocks = std::max<std::int64_t>(s.blocks, 1), tokens = std::max<std::int64_t>(s.tokens, 1);
  const std::int64_t bin = std::max<std::int64_t>(1, (s.tokens + max_rows - 1) / max_rows);
  const std::int64_t h0 = head ? *head : 0, h1 = head ? *head + 1 : s.heads;
  const double cw = pw / static_cast<double>(blocks);
  const auto x_of = [&](double j) { return left + j * cw; };
  const auto y_of = [&](double t) { return top + t * ph / static_cast<double>(tokens); };
  const auto ll = [](std::int64_t x) { return static_cast<long long>(x); };

  std::string svg = fmt("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" "
                        "width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n",
                        left + pw + legend, top + ph + bottom);
  std::string title = "Key blocks chosen by each query, " +
                      (head ? "head " + std::to_string(*head) : "all " + std::to_string(s.heads) + " heads") + ": " +
                      s.source;
  if (s.have_meta) title += " (block size " + std::to_string(s.block_size) + ", top-k " + std::to_string(s.top_k) + ")";
  svg += fmt("<text class=\"title\" x=\"%.0f\" y=\"24\" font-size=\"14\">", left) + xml_escape(title) + "</text>\n";
  svg += fmt("<rect id=\"plot\" x=\"%.3f\" y=\"%.3f\" width=\"%.3f\" height=\"%.3f\" fill=\"white\" stroke=\"black\" "
             "data-blocks=\"%lld\" data-tokens=\"%lld\" data-rows=\"%lld\"/>\n",
             left, top, pw, ph, ll(blocks), ll(tokens), ll(bin));

  std::vector<std::int64_t> count(blocks);
  std::string trace;
  for (std::size_t b = 0; b + 1 < s.cu_q.size(); ++b) {
    if (s.cu_q[b + 1] == s.cu_q[b]) continue;
    if (b > 0)
      svg += fmt("<line class=\"sequence\" x1=\"%.3f\" y1=\"%.3f\" x2=\"%.3f\" y2=\"%.3f\" stroke=\"gray\" "
                 "stroke-dasharray=\"4 3\"/>\n", left, y_of(s.cu_q[b]), left + pw, y_of(s.cu_q[b]));
    trace += "<polyline class=\"current\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" points=\"";
    for (std::int64_t t0 = s.cu_q[b]; t0 < s.cu_q[b + 1]; t0 += bin) {
      const std::int64_t t1 = std::min<std::int64_t>(t0 + bin, s.cu_q[b + 1]);
      std::fill(count.begin(), count.end(), 0);
      for (std::int64_t t = t0; t < t1; ++t)
        for (std::int64_t h = h0; h < h1; ++h)
          for (std::int64_t w = 0; w < s.width; ++w)
            if (const std::int32_t j = s.sel[(t * s.heads + h) * s.width + w]; j >= 0) ++count[j];
      const double row_pairs = static_cast<double>((t1 - t0) * (h1 - h0));
      for (std::int64_t j = 0; j < blocks; ++j) {
        if (!count[j]) continue;
        const double share = static_cast<double>(count[j]) / row_pairs;
        svg += fmt("<rect class=\"cell\" x=\"%.3f\" y=\"%.3f\" width=\"%.3f\" height=\"%.3f\" fill=\"#08306b\" "
                   "fill-opacity=\"%.4f\"><title>queries %lld-%lld, block %lld: %.1f%%</title></rect>\n",
                   x_of(j), y_of(t0), cw, y_of(t1) - y_of(t0), share, ll(t0), ll(t1 - 1), ll(j), 100 * share);
      }
      trace += fmt("%.3f,%.3f %.3f,%.3f ", x_of(s.current[t0] + 0.5), y_of(t0), x_of(s.current[t1 - 1] + 0.5), y_of(t1));
    }
    trace.back() = '"';
    trace += "/>\n";
  }
  svg += trace;

  // Axes: ticks at block centres and token starts, 1-2-5 steps.
  const std::int64_t xs = tick_step(blocks, 10), ys = tick_step(tokens, 10);
  for (std::int64_t j = 0; j < blocks; j += xs)
    svg += fmt("<line x1=\"%.3f\" y1=\"%.3f\" x2=\"%.3f\" y2=\"%.3f\" stroke=\"black\"/>"
               "<text class=\"xtick\" x=\"%.3f\" y=\"%.3f\" text-anchor=\"middle\">%lld</text>\n",
               x_of(j + 0.5), top + ph, x_of(j + 0.5), top + ph + 5, x_of(j + 0.5), top + ph + 18, ll(j));
  for (std::int64_t t = 0; t < tokens; t += ys)
    svg += fmt("<line x1=\"%.3f\" y1=\"%.3f\" x2=\"%.3f\" y2=\"%.3f\" stroke=\"black\"/>"
               "<text class=\"ytick\" x=\"%.3f\" y=\"%.3f\" text-anchor=\"end\">%lld</text>\n",
               left - 5, y_of(t), left, y_of(t), left - 8, y_of(t) + 4, ll(t));
  svg += fmt("<text class=\"xlabel\" x=\"%.3f\" y=\"%.3f\" text-anchor=\"middle\">key block</text>\n", left + pw / 2,
             top + ph + 40);
  svg += fmt("<text class=\"ylabel\" x=\"20\" y=\"%.3f\" text-anchor=\"middle\" transform=\"rotate(-90 20 %.3f)\">"
             "query token%s</text>\n", top + ph / 2, top + ph / 2,
             bin > 1 ? fmt(" (rows of %lld)", ll(bin)).c_str() : "");

  // Legend: the shade scale and the red trace.
  const double lx = left + pw + 20;
  svg += fmt("<g class=\"legend\"><text x=\"%.3f\" y=\"%.3f\">share of the row's queries</text>"
             "<text x=\"%.3f\" y=\"%.3f\">%s that chose the block</text>\n",
             lx, top + 10, lx, top + 26, head ? "" : "(x heads)");
  for (int i = 1; i <= 4; ++i)
    svg += fmt("<rect x=\"%.3f\" y=\"%.3f\" width=\"18\" height=\"18\" fill=\"#08306b\" fill-opacity=\"%.2f\" "
               "stroke=\"gray\"/><text x=\"%.3f\" y=\"%.3f\">%d%%</text>\n",
               lx, top + 20 + 24.0 * i, i / 4.0, lx + 26, top + 34 + 24.0 * i, 25 * i);
  svg += fmt("<line x1=\"%.3f\" y1=\"%.3f\" x2=\"%.3f\" y2=\"%.3f\" stroke=\"#d62728\" stroke-width=\"1.5\"/>"
             "<text x=\"%.3f\" y=\"%.3f\">current block (causal part)</text>\n",
             lx, top + 160, lx + 18, top + 160, lx + 26, top + 164);
  if (s.cu_q.size() > 2)
    svg += fmt("<line x1=\"%.3f\" y1=\"%.3f\" x2=\"%.3f\" y2=\"%.3f\" stroke=\"gray\" stroke-dasharray=\"4 3\"/>"
               "<text x=\"%.3f\" y=\"%.3f\">next sequence</text>\n",
               lx, top + 184, lx + 18, top + 184, lx + 26, top + 188);
  svg += "</g>\n</svg>\n";
  return svg;
}

void plot(const std::string& from, const fs::path& out, const std::string& head_text, std::int64_t max_rows) {
  const selection_info s = load_selection(from);
  std::optional<std::int64_t> head;
  if (!head_text.empty()) {
    head = parse_integer<std::int64_t>("--head", head_text, 0, max_tokens);
    if (*head >= s.heads)
      throw usage_error("--head = '" + head_text + "': " + s.source + " has " + std::to_string(s.heads) +
                        " heads (0 to " + std::to_string(s.heads - 1) + ")");
  }
  const std::string svg = selection_svg(s, head, max_rows);
  staging stage(out);
  const std::string name = out.filename().string();
  stage.write(name, [&](const std::string& path) { npy::write_file(path, {svg}); });
  stage.commit(name);
}

/// One line on stderr, whatever the message holds.
int fail(std::string message) {
  std::replace(message.begin(), message.end(), '\n', ' ');
  while (!message.empty() && message.back() == ' ') message.pop_back();
  std::fprintf(stderr, "moba-ref: %s\n", message.c_str());
  return 2;
}

int run_main(int argc, char** argv) {
  CLI::App app{"moba-ref: reference MoBA results as .npy files, for validating other kernels (moba " +
               std::string(moba::version_string) + ")"};
  app.require_subcommand(1);
  settings s;
  // Numbers arrive as text and are parsed strictly below.
  std::string seqlens, q_heads, kv_heads, head_dim, seed = "0", block_size, top_k, scale, tol;
  std::string out, q, k, v, cu, cu_k, dout, expected, actual, what = "out";

  auto add_common = [&](CLI::App* c) {
    c->add_option("--block-size", block_size, "keys per block, B >= 1")->required();
    c->add_option("--top-k", top_k, "blocks per query, the current one included, K >= 1")->required();
    c->add_option("--backend", s.backend, "reference or cpu (cuda needs a CUDA build)")
        ->check(CLI::IsMember({"reference", "cpu", "cuda"}));
    c->add_option("--mode", s.mode, "sparse (MoBA gating) or full (dense causal)")
        ->check(CLI::IsMember({"sparse", "full"}));
    auto* o = c->add_option("--scale", scale, "softmax scale (default 1/sqrt(head_dim))");
    c->add_option("--out", out, "output folder; must not exist yet")->required();
    return o;
  };
  auto* gen =
      app.add_subcommand("generate", "draw seeded standard-normal q, k, v and write them with the forward pass");
  gen->add_option("--seqlens", seqlens, "sequence lengths, comma-separated (prefill: q_len = k_len)")->required();
  gen->add_option("--q-heads", q_heads, "query heads")->required();
  gen->add_option("--kv-heads", kv_heads, "key/value heads (divides --q-heads)")->required();
  gen->add_option("--head-dim", head_dim, "head dimension")->required();
  gen->add_option("--dtype", s.dtype, "f64, f32, f16 or bf16 (bf16 stored as <u2 bits)")
      ->check(CLI::IsMember({"f64", "f32", "f16", "bf16"}));
  gen->add_option("--seed", seed, "random seed, 0 to 2^64 - 1");
  gen->add_flag("--grad", s.grad, "also draw dout and write the backward pass: dout, dq, dk, dv (and *_f64)");
  CLI::Option* gen_scale = add_common(gen);

  auto* runc = app.add_subcommand("run", "compute the forward pass on your own .npy inputs");
  runc->add_option("--q", q, "q.npy [total_q, Hq, D]")->required();
  runc->add_option("--k", k, "k.npy [total_k, Hkv, D]")->required();
  runc->add_option("--v", v, "v.npy [total_k, Hkv, D]")->required();
  runc->add_option("--cu-seqlens", cu, "cu_seqlens.npy (<i4 or <i8), batch + 1 offsets")->required();
  runc->add_option("--cu-seqlens-k", cu_k, "key offsets when they differ from the query's (q_len < k_len)");
  runc->add_option("--dout", dout, "dout.npy [total_q, Hq, D]: also write the backward pass (dq, dk, dv and *_f64)");
  std::string run_dtype;
  runc->add_option("--dtype", run_dtype, "compute dtype (default: q's); <f8 inputs are converted to it")
      ->check(CLI::IsMember({"f64", "f32", "f16", "bf16"}));
  CLI::Option* run_scale = add_common(runc);

  auto* chk = app.add_subcommand("check", "compare an output with the float64 result of a generate/run folder");
  chk->add_option("--expected", expected, "a folder written by generate or run")->required();
  chk->add_option("--actual", actual,
                  "your .npy (out, dq: [total_q, Hq, D]; lse: [total_q, Hq]; dk, dv: [total_k, Hkv, D])")
      ->required();
  chk->add_option("--what", what, "out, lse, dq, dk or dv")->check(CLI::IsMember({"out", "lse", "dq", "dk", "dv"}));
  CLI::Option* tol_opt =
      chk->add_option("--tol", tol, "relative-error tolerance, >= 0 (default: SPEC's bound for the dtype)");

  std::string from, head, max_rows = "256";
  auto* stc = app.add_subcommand("stats", "print what the gate chose: per-block load, near-ties, attended fraction");
  stc->add_option("--from", from, "a generate/run folder, or a selected.npy [tokens, Hq, width]")->required();
  auto* plc = app.add_subcommand("plot", "draw the selection as an SVG map (key block x query token)");
  plc->add_option("--from", from, "a generate/run folder, or a selected.npy [tokens, Hq, width]")->required();
  plc->add_option("--out", out, "the .svg file to write; must not exist yet")->required();
  plc->add_option("--head", head, "one query head (default: all heads, shaded by the share that chose a block)");
  plc->add_option("--max-rows", max_rows, "at most this many rows of queries (consecutive tokens binned), default 256");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    return fail(std::string(e.what()) + " (run with --help for usage)");
  }
  try {
    constexpr auto int64_max = std::numeric_limits<std::int64_t>::max();
    if (gen->parsed() || runc->parsed()) {
      s.cfg.block_size = parse_integer<std::int64_t>("--block-size", block_size, 1, int64_max);
      s.cfg.top_k = parse_integer<std::int64_t>("--top-k", top_k, 1, int64_max);
      if ((gen->parsed() ? gen_scale : run_scale)->count()) s.scale = parse_real("--scale", scale, false);
    }
    if (gen->parsed()) {
      s.q_heads = parse_integer<std::int64_t>("--q-heads", q_heads, 1, max_tokens);
      s.kv_heads = parse_integer<std::int64_t>("--kv-heads", kv_heads, 1, max_tokens);
      s.head_dim = parse_integer<std::int64_t>("--head-dim", head_dim, 1, max_tokens);
      const auto lens = parse_seqlens(seqlens);
      const auto seed_value =
          parse_integer<std::uint64_t>("--seed", seed, 0, std::numeric_limits<std::uint64_t>::max());
      generate(s, lens, seed_value, parse_out(out));
    }
    if (runc->parsed()) {
      s.dtype = run_dtype;
      const fs::path out_path = parse_out(out);
      run(s, q, k, v, cu, cu_k, dout, out_path);
    }
    if (stc->parsed()) {
      stats(from);
      return 0;
    }
    if (plc->parsed()) {
      const auto rows = parse_integer<std::int64_t>("--max-rows", max_rows, 1, 100'000);
      plot(from, parse_out(out), head, rows);
    }
    if (chk->parsed()) {
      std::optional<double> tolerance;
      if (tol_opt->count()) tolerance = parse_real("--tol", tol, true);
      return check(expected, actual, what, tolerance);
    }
    std::printf("wrote %s\n", out.c_str());
    return 0;
  } catch (const std::bad_alloc&) {
    return fail("out of memory for these sizes");
  } catch (const std::exception& e) {  // usage_error, npy::error, moba::invalid_argument, filesystem errors
    return fail(e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  install_signal_watcher();
  const int code = run_main(argc, argv);
  // The report of check (and generate's "wrote") must reach its reader too.
  if (std::fflush(stdout) != 0 || std::ferror(stdout))
    return fail(std::string("cannot write to standard output: ") + std::strerror(errno));
  return code;
}
