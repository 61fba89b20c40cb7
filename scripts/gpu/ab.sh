#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# On the GPU machine: moba_bench_cuda of this tree beside that of an older checkout (OLD), both built
# for sm_90a, run in turn ROUNDS times (default 2; 0 only builds) so that drift between runs shows.
# Builds are kept in /tmp/ab-new and /tmp/ab-old while the machine stays up. Logs go to $OUT.
# Usage: OLD=path/to/checkout [BENCH_FILTER=regex] scripts/gpu/ab.sh
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
old=${OLD:?OLD must name a checkout of the older tree}
build() {
  [[ -x $2/bench/cuda/moba_bench_cuda ]] && return
  cmake -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PWD/.gpu-deps" -DMOBA_CUDA=ON \
    -DMOBA_CUDA_ARCHITECTURES=90a -DMOBA_BUILD_TESTS=OFF -DMOBA_BUILD_TOOLS=OFF -DMOBA_BUILD_EXAMPLES=OFF \
    >"$out/configure-$3.log" 2>&1 && cmake --build "$2" -j8 --target moba_bench_cuda >"$out/build-$3.log" 2>&1 ||
    { echo "build of $3 failed"; tail -20 "$out/build-$3.log"; }
}
build . /tmp/ab-new new &
build "$old" /tmp/ab-old old &
wait
for round in $(seq 1 "${ROUNDS:-2}"); do
  for v in new old; do
    /tmp/ab-$v/bench/cuda/moba_bench_cuda --benchmark_filter="${BENCH_FILTER:-.}" \
      --benchmark_out="$out/bench-$v-$round.json" --benchmark_out_format=json 2>&1 |
      grep median | sed "s/^/$v $round /" | tee -a "$out/ab.txt"
  done
done
