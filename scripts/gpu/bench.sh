#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# On the GPU machine, in one run: build + tests + sanitizers (test.sh), moba_bench_cuda, then the
# PyTorch baselines (compare.py). Everything is logged under $OUT.
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
BUILD_BENCH=1 scripts/gpu/test.sh build-gpu
echo "== moba_bench_cuda"
build-gpu/bench/cuda/moba_bench_cuda --benchmark_out="$out/bench.json" --benchmark_out_format=json \
  ${BENCH_FILTER:+--benchmark_filter=$BENCH_FILTER} 2>&1 | grep -E "median|Benchmark|error|what" | tee "$out/bench.txt"
if [[ -z "${SKIP_COMPARE:-}" ]]; then
  echo "== PyTorch baselines"
  PYTHONUNBUFFERED=1 python3 scripts/gpu/compare.py ${COMPARE_ARGS:-} 2>&1 | grep -v Warning | tee "$out/compare.txt"
fi
