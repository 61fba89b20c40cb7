// SPDX-License-Identifier: MIT
/// @file CUDA runtime errors as moba::device_error naming the call and cudaGetErrorString (host-readable).
#pragma once

#include <cuda_runtime.h>

#include <moba/error.hpp>

namespace moba::backends::cuda {

/// Throws moba::device_error("moba::cuda: <call> failed: <cudaGetErrorString>") unless `status` is success.
inline void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    throw device_error(detail::concat("moba::cuda: ", call, " failed: ", cudaGetErrorString(status), " (",
                                      static_cast<int>(status), ")"));
}

}  // namespace moba::backends::cuda

/// Checks one CUDA runtime call, naming it in the error.
#define MOBA_CUDA_CHECK(call) ::moba::backends::cuda::check((call), #call)
