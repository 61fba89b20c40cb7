#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# SPEC §Threads under ThreadSanitizer: one moba::cpu object and one moba::reference object called from
# several std::threads at once. Serial CPU build (MOBA_CPU_SERIAL): Debian's oneTBB is not instrumented,
# so its internals would only add noise; the calls' own threads are what is checked here.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags=(-std=c++20 -O1 -g -fsanitize=thread -DMOBA_CPU_SERIAL -march=native -Iinclude -Ibackends/reference/include
       -Ibackends/cpu/include -Itests -I/usr/include/eigen3)
g++ "${flags[@]}" -c tests/support/doctest_main.cpp -o "$work/main.o"
g++ "${flags[@]}" tests/cpu/test_cpu_threads.cpp "$work/main.o" -o "$work/test_cpu_threads" &
cpu=$!
g++ "${flags[@]}" tests/reference/test_host_properties.cpp "$work/main.o" -o "$work/test_reference_threads"
wait $cpu
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
# GCC 12's TSan cannot map its shadow under the high mmap randomisation of newer kernels
# ("unexpected memory mapping"): then run without address randomisation.
tsan() {
  local log=$work/log rc=0
  "$@" 2>"$log" || rc=$?
  if ((rc != 0)) && grep -q 'unexpected memory mapping' "$log"; then
    rc=0
    setarch "$(uname -m)" -R "$@" || rc=$?
  else
    cat "$log" >&2
  fi
  return "$rc"
}
tsan "$work/test_cpu_threads"
tsan "$work/test_reference_threads" -tc='*threads*'
