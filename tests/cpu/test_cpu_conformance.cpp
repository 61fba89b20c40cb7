// SPDX-License-Identifier: MIT
/// @file The forward property suite on moba::cpu, all four dtypes.
#include "conformance/forward.hpp"

MOBA_FORWARD_CONFORMANCE(moba::cpu, double, float, moba::float16, moba::bfloat16)
