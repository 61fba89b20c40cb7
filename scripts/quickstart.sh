#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Installs what is missing, builds the quickstart example and runs it: MoBA beside dense attention.
# Usage: scripts/quickstart.sh [tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOBA_CUDA=OFF >/dev/null
cmake --build build --target quickstart
build/examples/quickstart "$@"
