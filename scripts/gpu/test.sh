#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# On the GPU machine: configure + build the CUDA tests, run them, then compute-sanitizer memcheck and
# racecheck on a small case. Logs go to $OUT (or ./gpu-out). Usage: scripts/gpu/test.sh [build-dir]
# MOBA_ARCH picks the target: 90a (default; the wgmma mainloop), 90 (mma.sync mainloop, bulk copies) or
# 80 (mma.sync mainloop, cp.async only).
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
build=${1:-build-gpu}
arch=${MOBA_ARCH:-90a}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PWD/.gpu-deps" -DMOBA_CUDA=ON \
  -DMOBA_CUDA_ARCHITECTURES=$arch -DMOBA_BUILD_TOOLS=OFF -DMOBA_BUILD_EXAMPLES=OFF >"$out/configure-$arch.log" 2>&1 ||
  { tail -30 "$out/configure-$arch.log"; exit 1; }
cmake --build "$build" -j16 --target test_cuda ${BUILD_BENCH:+moba_bench_cuda} >"$out/build-$arch.log" 2>&1 ||
  { grep -E "error" "$out/build-$arch.log" | head -30; exit 1; }
echo "== test_cuda (sm_$arch)"
"$build/tests/cuda/test_cuda" 2>&1 | tee "$out/test-$arch.log" | tail -25
echo "== memcheck"
compute-sanitizer --tool memcheck --error-exitcode 9 "$build/tests/cuda/test_cuda" -tc='*GQA*,*workspace*,*work items*,*device offsets*,*hostile*,*selection*,*graph*,*two threads*,*NaN*,*denormal*' 2>&1 | tee "$out/memcheck-$arch.log" | tail -6
echo "== racecheck"
compute-sanitizer --tool racecheck --error-exitcode 9 "$build/tests/cuda/test_cuda" -tc='*GQA*,*work items*,*device offsets*,*selection*,*NaN*' 2>&1 | tee "$out/racecheck-$arch.log" | tail -6
