#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Compile-only check of moba::cuda with nvcc for sm_80, sm_90 and sm_90a (wgmma; no GPU needed):
# instantiates backend_impl<cuda, T> for bf16, f16 and float (every kernel, head dims 64 and 128),
# the GPU quickstart and the benchmark, with warnings as errors, and fails if ptxas serialises wgmma
# (a product issued or waited for under a branch costs the overlap of the tile loop). Exits 0 with a
# note when nvcc is absent. Usage: scripts/ci/cuda-compile.sh
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
flags=(-std=c++20 -O2 -Werror all-warnings -I"$root/include" -I"$root/backends/cuda/include"
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
       -gencode=arch=compute_90a,code=sm_90a)
"$nvcc" "${flags[@]}" -Xptxas -v -c "$tmp/instantiate.cu" -o "$tmp/instantiate.o" 2>"$tmp/ptxas.log" ||
  { cat "$tmp/ptxas.log"; exit 1; }
echo "cuda-compile: backend_impl<cuda, bf16|f16|float> compiled for sm_80, sm_90 and sm_90a"
if grep "wgmma.mma_async instructions are serialized" "$tmp/ptxas.log"; then
  echo "cuda-compile: ptxas serialised wgmma (above)"
  exit 1
fi
"$nvcc" "${flags[@]}" -c "$root/examples/quickstart_cuda.cu" -o "$tmp/quickstart_cuda.o"
echo "cuda-compile: examples/quickstart_cuda.cu compiled for sm_80, sm_90 and sm_90a"
if [[ -f /usr/include/benchmark/benchmark.h ]]; then
  "$nvcc" "${flags[@]}" -c "$root/bench/cuda/bench_cuda.cu" -o "$tmp/bench.o"
  echo "cuda-compile: bench/cuda/bench_cuda.cu compiled for sm_80, sm_90 and sm_90a"
fi
