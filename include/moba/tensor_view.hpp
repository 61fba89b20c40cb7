// SPDX-License-Identifier: MIT
/// @file A small strided, non-owning view with 64-bit extents and strides, usable on host and device.
#pragma once

#include <cstdint>
#include <type_traits>

#include <moba/detail/macros.hpp>
#include <moba/error.hpp>

namespace moba {

/// A pointer plus `Rank` extents and strides, both counted in elements (not bytes).
/// Trivially copyable, so it can be a kernel argument. An empty view (`data == nullptr`, zero
/// extents) means "not given" for optional outputs.
template <class T, int Rank>
struct tensor_view {
  T* data = nullptr;
  std::int64_t extent[Rank] = {};
  std::int64_t stride[Rank] = {};

  static constexpr int rank = Rank;

  template <class... I>
  MOBA_HOST_DEVICE T& operator()(I... index) const {
    static_assert(sizeof...(I) == Rank, "one index per dimension");
    const std::int64_t idx[] = {static_cast<std::int64_t>(index)...};
    std::int64_t offset = 0;
    for (int r = 0; r < Rank; ++r) offset += idx[r] * stride[r];
    return data[offset];
  }

  MOBA_HOST_DEVICE std::int64_t size() const {
    std::int64_t n = 1;
    for (int r = 0; r < Rank; ++r) n *= extent[r];
    return n;
  }

  MOBA_HOST_DEVICE bool given() const { return data != nullptr; }

  /// A read-only view of the same elements. A template, so that a view of const elements (which is
  /// one already) declares no conversion to its own type, which nvcc warns of (#554).
  template <class U>
    requires(std::is_same_v<U, T> && !std::is_const_v<T>)
  MOBA_HOST_DEVICE operator tensor_view<const U, Rank>() const {
    tensor_view<const U, Rank> v;
    v.data = data;
    for (int r = 0; r < Rank; ++r) {
      v.extent[r] = extent[r];
      v.stride[r] = stride[r];
    }
    return v;
  }
};

/// Activations are rank 4: `[batch, seq, heads, dim]`. Packed varlen tensors use batch = 1.
template <class T>
using view4 = tensor_view<T, 4>;

namespace detail {
/// Contiguous strides of `extents` (the last axis fastest), every product checked before the view
/// exists: a view with overflowing strides would pass the validator's own overflow test.
template <int Rank>
void contiguous_strides(const char* layout, const std::int64_t (&extent)[Rank], std::int64_t (&stride)[Rank]) {
  std::int64_t step = 1;
  for (int r = Rank - 1; r >= 0; --r) {
    require(extent[r] >= 0, layout, ": extent ", r, " = ", extent[r], "; extents must be >= 0");
    stride[r] = step;
    require(!__builtin_mul_overflow(step, extent[r] > 0 ? extent[r] : 1, &step), layout,
            ": the product of the extents overflows 64 bits at extent ", r, " = ", extent[r]);
  }
}

template <class T, int Rank>
tensor_view<T, Rank> contiguous(const char* layout, T* data, const std::int64_t (&extent)[Rank]) {
  tensor_view<T, Rank> v;
  v.data = data;
  for (int r = 0; r < Rank; ++r) v.extent[r] = extent[r];
  contiguous_strides(layout, v.extent, v.stride);
  return v;
}
}  // namespace detail

/// `[batch, seq, heads, dim]` stored contiguously (flash-attention's padded layout; for varlen
/// pass batch = 1 and seq = total tokens). Throws moba::invalid_argument if the size overflows.
template <class T>
view4<T> bshd(T* data, std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t dim) {
  return detail::contiguous<T, 4>("moba::bshd", data, {batch, seq, heads, dim});
}

/// Packed varlen `[total, heads, dim]`, seen as `[1, total, heads, dim]`.
template <class T>
view4<T> packed(T* data, std::int64_t total, std::int64_t heads, std::int64_t dim) {
  return detail::contiguous<T, 4>("moba::packed", data, {1, total, heads, dim});
}

/// Hugging Face `[batch, heads, seq, dim]` storage, viewed as `[batch, seq, heads, dim]` without a copy.
template <class T>
view4<T> bhsd(T* data, std::int64_t batch, std::int64_t heads, std::int64_t seq, std::int64_t dim) {
  const view4<T> s = detail::contiguous<T, 4>("moba::bhsd", data, {batch, heads, seq, dim});
  return {data, {batch, seq, heads, dim}, {s.stride[0], s.stride[2], s.stride[1], 1}};
}

/// Log-sum-exp output `[batch, seq, heads]`, contiguous.
template <class T>
tensor_view<T, 3> bsh(T* data, std::int64_t batch, std::int64_t seq, std::int64_t heads) {
  return detail::contiguous<T, 3>("moba::bsh", data, {batch, seq, heads});
}

/// Selected-block output `[batch, seq, heads, width]` of int32 block indices, contiguous.
template <class I = std::int32_t>
  requires std::is_same_v<std::remove_const_t<I>, std::int32_t>
tensor_view<I, 4> selection(I* data, std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t width) {
  return detail::contiguous<I, 4>("moba::selection", data, {batch, seq, heads, width});
}

static_assert(std::is_trivially_copyable_v<view4<float>>);

}  // namespace moba
