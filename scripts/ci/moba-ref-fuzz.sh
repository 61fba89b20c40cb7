#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Fuzzes the .npy reader of moba-ref with libFuzzer + ASan + UBSan for a bounded time (MOBA_FUZZ_SECONDS,
# default 60), starting from tests/fuzz/corpus. Any crash, sanitizer report or leak fails the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/install-deps.sh clang libclang-rt-14-dev
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -Itools/moba-ref tests/fuzz/fuzz_npy.cpp -o "$work/fuzz_npy"
cp -r tests/fuzz/corpus "$work/corpus"
"$work/fuzz_npy" -max_total_time="${MOBA_FUZZ_SECONDS:-60}" -detect_leaks=1 -print_final_stats=1 \
  -artifact_prefix="$work/" "$work/corpus" 2>&1 | tail -n 15
