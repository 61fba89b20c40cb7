// SPDX-License-Identifier: MIT
/// @file The forward property suite on moba::reference, all four dtypes.
#include "conformance/forward.hpp"

MOBA_FORWARD_CONFORMANCE(moba::reference, double, float, moba::float16, moba::bfloat16)
