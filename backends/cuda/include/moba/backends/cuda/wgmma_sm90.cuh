// SPDX-License-Identifier: MIT
/// @file The Hopper (sm_90a) tensor-core instructions of the attention mainloop: wgmma.mma_async with
/// fp32 accumulators, shared-memory matrix descriptors for 128-byte-swizzled tiles, and the fences
/// (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"). Compiled only for sm_90a.
#pragma once

#include <cstdint>

#include <moba/backends/cuda/mma_sm80.cuh>
#include <moba/dtype.hpp>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOBA_CUDA_WGMMA 1
#endif

namespace moba::backends::cuda {

/// Makes this thread's ordinary shared-memory writes (cp.async included) visible to the async proxy
/// (wgmma's operand reads); sm_90+.
__device__ __forceinline__ void fence_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/// Bulk copies (the TMA engine; sm_90+) of `bytes` (a multiple of 16, both addresses 16-byte aligned).
/// Shared -> global: one asynchronous copy of this thread's bulk group; the source must stay
/// unchanged until bulk_wait_read says the copies have read it, and fence_async_shared orders the
/// writes that filled it before. Global -> shared: completes on an mbarrier that expects its bytes.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOBA_CUDA_BULK_COPY 1
__device__ __forceinline__ void bulk_load(void* dst, const void* src, std::uint32_t bytes, std::uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_address(dst)),
               "l"(src), "r"(bytes), "r"(smem_address(bar))
               : "memory");
}
/// An mbarrier for one arrival per phase (thread 0 of the CTA), visible to the TMA engine.
__device__ __forceinline__ void mbarrier_init(std::uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_address(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/// The phase's one arrival, expecting `bytes` of bulk loads.
__device__ __forceinline__ void mbarrier_arrive_expect(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes) : "memory");
}
/// Waits until the phase of parity `phase` has completed (its loads are visible).
__device__ __forceinline__ void mbarrier_wait(std::uint64_t* bar, int phase) {
  asm volatile(
      "{\n .reg .pred done;\n wait:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra wait;\n}\n" ::"r"(smem_address(bar)),
      "r"(phase)
      : "memory");
}
__device__ __forceinline__ void bulk_store(void* dst, const void* src, std::uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(smem_address(src)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
/// Waits until this thread's bulk copies have read their sources.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
/// Waits until this thread's bulk copies are complete.
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
#endif

#if defined(MOBA_CUDA_WGMMA)

/// Matrix descriptor of a 128B-swizzled shared-memory operand: start address, leading- and
/// stride-dimension byte offsets (each encoded >> 4), swizzle mode 1 (128B) in bits 62-63.
__device__ __forceinline__ std::uint64_t wgmma_desc(const void* start, std::uint32_t leading_bytes,
                                                    std::uint32_t stride_bytes) {
  const std::uint64_t addr = smem_address(start);
  return ((addr & 0x3FFFF) >> 4) | (std::uint64_t{(leading_bytes >> 4) & 0x3FFF} << 16) |
         (std::uint64_t{(stride_bytes >> 4) & 0x3FFF} << 32) | (std::uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}

#define MOBA_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])

/// d (m64 × N, fp32, mma accumulator layout per warp) += A·B for one warpgroup, k = 16.
/// ss: A and B both K-major in shared memory. rs_mn: A in registers (the mma.m16n8k16 A fragment
/// of each warp's 16 rows), B N-major in shared memory (".trans", imm-trans-b = 1).
template <int N, class T>
struct wgmma;

template <>
struct wgmma<64, bfloat16> {
  __device__ static void ss(float (&d)[32], std::uint64_t a, std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24)
                 : "l"(a), "l"(b), "r"(accumulate));
  }
  __device__ static void rs_mn(float (&d)[32], const std::uint32_t (&a)[4], std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

template <>
struct wgmma<64, float16> {
  __device__ static void ss(float (&d)[32], std::uint64_t a, std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24)
                 : "l"(a), "l"(b), "r"(accumulate));
  }
  __device__ static void rs_mn(float (&d)[32], const std::uint32_t (&a)[4], std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

template <>
struct wgmma<128, bfloat16> {
  __device__ static void ss(float (&d)[64], std::uint64_t a, std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24), MOBA_ACC8(32), MOBA_ACC8(40), MOBA_ACC8(48), MOBA_ACC8(56)
                 : "l"(a), "l"(b), "r"(accumulate));
  }
  __device__ static void rs_mn(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24), MOBA_ACC8(32), MOBA_ACC8(40), MOBA_ACC8(48), MOBA_ACC8(56)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

template <>
struct wgmma<128, float16> {
  __device__ static void ss(float (&d)[64], std::uint64_t a, std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24), MOBA_ACC8(32), MOBA_ACC8(40), MOBA_ACC8(48), MOBA_ACC8(56)
                 : "l"(a), "l"(b), "r"(accumulate));
  }
  __device__ static void rs_mn(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
                 : MOBA_ACC8(0), MOBA_ACC8(8), MOBA_ACC8(16), MOBA_ACC8(24), MOBA_ACC8(32), MOBA_ACC8(40), MOBA_ACC8(48), MOBA_ACC8(56)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

#undef MOBA_ACC8

#endif  // MOBA_CUDA_WGMMA

}  // namespace moba::backends::cuda
