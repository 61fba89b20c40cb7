// SPDX-License-Identifier: MIT
/// @file libFuzzer harness for the .npy parser: any input either parses consistently or throws npy::error.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "npy.hpp"

namespace npy = moba_ref::npy;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto a = npy::parse(reinterpret_cast<const char*>(data), size);
    // A parsed array must hold exactly the bytes its shape and dtype say.
    if (static_cast<std::size_t>(a.count()) * npy::item_size(a.descr) != a.data.size()) std::abort();
    // and must survive a round trip through the header moba-ref writes.
    std::string again = npy::header(a.descr, a.shape);
    again.append(a.data.begin(), a.data.end());
    const auto b = npy::parse(again.data(), again.size());
    if (b.descr != a.descr || b.shape != a.shape || b.data != a.data) std::abort();
  } catch (const npy::error&) {
  }
  return 0;
}
