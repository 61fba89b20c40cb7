// SPDX-License-Identifier: MIT
/// @file Runs moba::cuda on the host tensors of the test suite: copies every view's span to the device,
/// calls forward (or backward), synchronises and copies the outputs back (only when the call did not throw).
#pragma once

#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include <moba/backends/cuda/check.hpp>
#include <moba/moba.hpp>

#include "support/support.hpp"

namespace moba::test {

/// Elements a strided view can touch: 1 + the largest offset (0 for an empty view).
template <class V>
std::int64_t span_elements(const V& v) {
  if (v.data == nullptr) return 0;
  std::int64_t last = 0;
  for (int r = 0; r < V::rank; ++r) {
    if (v.extent[r] == 0) return 0;
    last += (v.extent[r] - 1) * v.stride[r];
  }
  return last + 1;
}

/// A device copy of a host view: same extents and strides, data in its own cudaMalloc.
template <class T, int Rank>
struct device_copy {
  using host_t = std::remove_const_t<T>;
  tensor_view<T, Rank> host;
  host_t* device = nullptr;
  std::int64_t n = 0;

  explicit device_copy(tensor_view<T, Rank> h) : host(h), n(span_elements(h)) {
    if (n == 0) return;
    MOBA_CUDA_CHECK(cudaMalloc(&device, n * sizeof(host_t)));
    MOBA_CUDA_CHECK(cudaMemcpy(device, h.data, n * sizeof(host_t), cudaMemcpyHostToDevice));
  }
  device_copy(const device_copy&) = delete;
  ~device_copy() { cudaFree(device); }
  tensor_view<T, Rank> view() const {
    tensor_view<T, Rank> v = host;
    v.data = n == 0 ? nullptr : device;
    return v;
  }
  void copy_back() const {
    if (n != 0) MOBA_CUDA_CHECK(cudaMemcpy(const_cast<host_t*>(host.data), device, n * sizeof(host_t), cudaMemcpyDeviceToHost));
  }
};

template <class T>
struct runner<cuda, T> {
  static void forward(attention<cuda, T>& attn, const forward_args<T>& a) { call(attn, a, false); }
  static void gate(attention<cuda, T>& attn, const forward_args<T>& a) { call(attn, a, true); }

  static void call(attention<cuda, T>& attn, const forward_args<T>& a, bool gate_only) {
    device_copy q(a.q), k(a.k), v(a.v);
    device_copy out(a.out);
    device_copy lse(a.lse);
    device_copy sel(a.selected);
    device_copy given(a.selection);
    forward_args<T> d = a;
    d.q = q.view();
    d.k = k.view();
    d.v = v.view();
    d.out = out.view();
    d.lse = lse.view();
    d.selected = sel.view();
    d.selection = given.view();
    if (gate_only) {
      attn.gate(d);
    } else {
      attn.forward(d);
    }
    MOBA_CUDA_CHECK(cudaStreamSynchronize(attn.backend().stream()));
    MOBA_CUDA_CHECK(cudaGetLastError());
    out.copy_back();
    lse.copy_back();
    sel.copy_back();
  }

  static void backward(attention<cuda, T>& attn, const backward_args<T>& a) {
    device_copy q(a.q), k(a.k), v(a.v), out(a.out), dout(a.dout);
    device_copy dq(a.dq), dk(a.dk), dv(a.dv);
    device_copy lse(a.lse);
    device_copy given(a.selection);
    backward_args<T> d = a;
    d.q = q.view();
    d.k = k.view();
    d.v = v.view();
    d.out = out.view();
    d.dout = dout.view();
    d.lse = lse.view();
    d.selection = given.view();
    d.dq = dq.view();
    d.dk = dk.view();
    d.dv = dv.view();
    attn.backward(d);
    MOBA_CUDA_CHECK(cudaStreamSynchronize(attn.backend().stream()));
    MOBA_CUDA_CHECK(cudaGetLastError());
    dq.copy_back();
    dk.copy_back();
    dv.copy_back();
  }
};

}  // namespace moba::test
