// SPDX-License-Identifier: MIT
/// @file The library version, kept in step with CMake's project(VERSION).
#pragma once

#define MOBA_VERSION_MAJOR 0
#define MOBA_VERSION_MINOR 1
#define MOBA_VERSION_PATCH 0

namespace moba {
inline constexpr const char* version_string = "0.1.0";
}  // namespace moba
