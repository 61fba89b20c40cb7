#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Installs the Debian 12 packages moba builds and tests with; does nothing for those already present.
# Usage: scripts/install-deps.sh [extra-package ...]
set -euo pipefail

packages=(cmake g++ ninja-build pkg-config libeigen3-dev libtbb-dev libxsimd-dev xtl-dev doctest-dev
          libbenchmark-dev libcli11-dev nlohmann-json3-dev python3-numpy "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
