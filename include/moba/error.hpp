// SPDX-License-Identifier: MIT
/// @file Exceptions and the check helpers whose messages name the argument and the values seen.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moba {

/// Bad arguments; thrown before any output is written (SPEC §Bad input).
struct invalid_argument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// A device (runtime) failure, e.g. a CUDA error, with the call and the driver's message.
struct device_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream s;
  (s << ... << std::forward<Parts>(parts));
  return s.str();
}

/// Throws moba::invalid_argument("moba: " + parts...) unless `ok`.
template <class... Parts>
void require(bool ok, Parts&&... parts) {
  if (!ok) throw invalid_argument(concat("moba: ", std::forward<Parts>(parts)...));
}

}  // namespace detail
}  // namespace moba
