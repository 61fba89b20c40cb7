#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Compile-only check of moba::cuda with nvcc for sm_80, sm_90 and sm_90a (wgmma; no GPU needed): instantiates
# backend_impl<cuda, T> for bf16, f16 and float (every kernel, head dims 64 and 128) and the
# benchmark. Exits 0 with a note when nvcc is absent. Usage: scripts/ci/cuda-compile.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
nvcc=${NVCC:-nvcc}
if ! command -v "$nvcc" >/dev/null; then
  echo "cuda-compile: no nvcc on PATH; skipped"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/instantiate.cu" <<'CU'
#include <moba/moba.hpp>
template struct moba::backend_impl<moba::cuda, moba::bfloat16>;
template struct moba::backend_impl<moba::cuda, moba::float16>;
template struct moba::backend_impl<moba::cuda, float>;
CU
flags=(-std=c++20 -O2 -diag-suppress=554,20012 -Werror all-warnings -I"$root/include" -I"$root/backends/cuda/include"
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
       -gencode=arch=compute_90a,code=sm_90a)
"$nvcc" "${flags[@]}" -c "$tmp/instantiate.cu" -o "$tmp/instantiate.o"
echo "cuda-compile: backend_impl<cuda, bf16|f16|float> compiled for sm_80, sm_90 and sm_90a"
if [[ -f /usr/include/benchmark/benchmark.h ]]; then
  "$nvcc" "${flags[@]}" -c "$root/bench/cuda/bench_cuda.cu" -o "$tmp/bench.o"
  echo "cuda-compile: bench/cuda/bench_cuda.cu compiled for sm_80, sm_90 and sm_90a"
fi
