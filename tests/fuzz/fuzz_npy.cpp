// SPDX-License-Identifier: MIT
/// @file libFuzzer harness for the .npy parser: any input either parses consistently or throws npy::error.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto a = moba_ref::npy::parse(reinterpret_cast<const char*>(data), size);
    // A parsed array must hold exactly the bytes its shape and dtype say.
    if (static_cast<std::size_t>(a.count()) * moba_ref::npy::item_size(a.descr) != a.data.size()) std::abort();
  } catch (const moba_ref::npy::error&) {
  }
  return 0;
}
