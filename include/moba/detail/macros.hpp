// SPDX-License-Identifier: MIT
/// @file Portability macros; the only file that looks at __CUDACC__.
#pragma once

#if defined(__CUDACC__)
#define MOBA_HOST_DEVICE __host__ __device__ inline
#define MOBA_RESTRICT __restrict__
#else
#define MOBA_HOST_DEVICE inline
#define MOBA_RESTRICT __restrict
#endif
