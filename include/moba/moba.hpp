// SPDX-License-Identifier: MIT
/// @file Umbrella header: the public API and every backend this build has.
#pragma once

#include <moba/attention.hpp>
#include <moba/config.hpp>
#include <moba/core/flops.hpp>
#include <moba/dtype.hpp>
#include <moba/error.hpp>
#include <moba/fwd.hpp>
#include <moba/tensor_view.hpp>
#include <moba/varlen.hpp>
#include <moba/version.hpp>

#if __has_include(<moba/backends/reference/forward.hpp>)
#include <moba/backends/reference/forward.hpp>
#endif
#if __has_include(<moba/backends/cpu/forward.hpp>)
#include <moba/backends/cpu/forward.hpp>
#endif
#if defined(__CUDACC__) && __has_include(<moba/backends/cuda/forward.cuh>)
#include <moba/backends/cuda/forward.cuh>
#endif
