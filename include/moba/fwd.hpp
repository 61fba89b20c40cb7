// SPDX-License-Identifier: MIT
/// @file Declarations only: backend tags, dtypes, the backend hook and moba::attention.
#pragma once

#include <moba/dtype.hpp>

namespace moba {

/// Backend tags: the float64 oracle, the SIMD+threads CPU backend, and CUDA.
struct reference {};
struct cpu {};
struct cuda {};

namespace detail {
template <class>
inline constexpr bool always_false = false;
}

/// Each backend specialises this in its own header with: a constructor from `config`, a
/// `static constexpr const char* name`, `static bool supports_head_dim(std::int64_t)`,
/// `static std::string head_dims()`, `void check(const core::fwd_params<Dtype>&)` (backend-specific
/// input checks, may throw) and `void forward(const core::fwd_params<Dtype>&)`.
template <class Backend, class Dtype>
struct backend_impl {
  static_assert(detail::always_false<Backend>,
                "moba: this backend's header is not included; include <moba/moba.hpp> in a build that has it "
                "(moba::cuda needs nvcc: <moba/backends/cuda/forward.cuh>)");
};

template <class Backend, class Dtype>
class attention;

}  // namespace moba
