#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# NEON for real: cross-compiles the core tests and the moba::cpu conformance suite for aarch64 (xsimd picks
# neon64) and runs them under qemu-user. Serial (MOBA_CPU_SERIAL): no arm64 oneTBB is needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/install-deps.sh g++-aarch64-linux-gnu qemu-user-static
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags=(-std=c++20 -O2 -static -DMOBA_CPU_SERIAL -Iinclude -Ibackends/reference/include -Ibackends/cpu/include -Itests
       -I/usr/include/eigen3)
# The host's header-only packages (doctest, Eigen, xsimd, xtl) serve the cross compiler as they are.
aarch64-linux-gnu-g++ "${flags[@]}" -isystem /usr/include -c tests/support/doctest_main.cpp -o "$work/main.o"
aarch64-linux-gnu-g++ "${flags[@]}" -isystem /usr/include tests/core/test_gate.cpp tests/core/test_online_softmax.cpp \
  tests/core/test_flops.cpp tests/core/test_dtype.cpp "$work/main.o" -o "$work/test_core" &
core=$!
aarch64-linux-gnu-g++ "${flags[@]}" -isystem /usr/include tests/cpu/test_cpu_backward.cpp "$work/main.o" \
  -o "$work/test_cpu_backward" &
backward=$!
aarch64-linux-gnu-g++ "${flags[@]}" -isystem /usr/include tests/cpu/test_cpu_conformance.cpp "$work/main.o" \
  -o "$work/test_cpu"
wait $core
wait $backward
# The kernel must really be NEON: vector FMAs on v registers.
neon_fmas=$(aarch64-linux-gnu-objdump -d "$work/test_cpu" | grep -cE '\sfmla\s+v[0-9]+\.4s' || true)
echo "NEON fmla instructions in test_cpu: $neon_fmas"
((neon_fmas > 0))
qemu-aarch64-static "$work/test_core"
qemu-aarch64-static "$work/test_cpu"
# Backward against the reference in float and bf16 (serial here, so the thread-count test is moot).
qemu-aarch64-static "$work/test_cpu_backward" -tc='*backward matches*<float>,*backward matches*<moba::bfloat16>,*bad selection*'
