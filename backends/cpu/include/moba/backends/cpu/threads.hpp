// SPDX-License-Identifier: MIT
/// @file Threads of the CPU backend: oneTBB, or serial loops where it is unavailable (MOBA_CPU_SERIAL,
/// e.g. the aarch64 cross build run under qemu).
#pragma once

#include <cstdint>
#include <utility>

#if !defined(MOBA_CPU_SERIAL)
#include <oneapi/tbb/enumerable_thread_specific.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>
#endif

namespace moba::backends::cpu {

#if !defined(MOBA_CPU_SERIAL)

/// A pool of `threads` workers (0: every core).
struct thread_pool {
  tbb::task_arena arena;
  explicit thread_pool(int threads) : arena(threads > 0 ? threads : tbb::task_arena::automatic) {}
  template <class F>
  void run(F&& f) {
    arena.execute(std::forward<F>(f));
  }
};

/// f(i) for i in [0, n), each index its own task: items are coarse and sorted costliest first.
template <class F>
void parallel_for_each(std::int64_t n, F&& f) {
  tbb::parallel_for(
      tbb::blocked_range<std::int64_t>(0, n, 1),
      [&](const tbb::blocked_range<std::int64_t>& r) {
        for (std::int64_t i = r.begin(); i != r.end(); ++i) f(i);
      },
      tbb::simple_partitioner());
}

template <class T>
using per_thread = tbb::enumerable_thread_specific<T>;

#else

struct thread_pool {
  explicit thread_pool(int) {}
  template <class F>
  void run(F&& f) {
    f();
  }
};

template <class F>
void parallel_for_each(std::int64_t n, F&& f) {
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

template <class T>
struct per_thread {
  T value;
  T& local() { return value; }
};

#endif

}  // namespace moba::backends::cpu
