#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The installed moba.pc: install the build tree to a fresh prefix (not the configured one, so the
# file must find its prefix from its own place), then build and run the consumer with pkg-config alone.
# Usage: test_pkgconfig.sh BUILD_DIR SOURCE_DIR CXX VERSION
set -euo pipefail
build=$1 source=$2 cxx=$3 version=$4
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
pc=$(find "$prefix" -name moba.pc)
[[ -n $pc ]] || { echo "no moba.pc under $prefix"; exit 1; }
package=$(find "$prefix" -type d -path '*/cmake/moba')  # LIBDIR/cmake/moba; moba.pc goes to LIBDIR/pkgconfig
[[ -n $package && $(dirname "$pc") == "$(dirname "$(dirname "$package")")/pkgconfig" ]] ||
  { echo "moba.pc ($pc) is not beside the CMake package"; exit 1; }
export PKG_CONFIG_PATH=$(dirname "$pc")
[[ $(pkg-config --modversion moba) == "$version" ]] || { echo "version $(pkg-config --modversion moba) != $version"; exit 1; }
include=$(pkg-config --cflags-only-I moba | tr ' ' '\n' | grep -m1 -- "-I.*include$" | cut -c3-)
[[ $(realpath "$include") == "$(realpath "$prefix/include")" ]] || { echo "include dir $include is not $prefix/include"; exit 1; }
[[ -f $include/moba/moba.hpp ]] || { echo "no moba/moba.hpp under $include"; exit 1; }
# shellcheck disable=SC2046  # pkg-config's flags are words
"$cxx" -std=c++20 -o "$prefix/consumer" "$source/examples/consumer/main.cpp" $(pkg-config --cflags --libs moba)
"$prefix/consumer"
