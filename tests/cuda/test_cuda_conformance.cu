// SPDX-License-Identifier: MIT
/// @file The forward property suite on moba::cuda (device copies through device_runner.hpp).
#include "conformance/forward.hpp"
#include "cuda/device_runner.hpp"

MOBA_FORWARD_CONFORMANCE(moba::cuda, float, moba::float16, moba::bfloat16)
