// Device-side helpers: dtype conversion, 16-byte vector access, warp and block reductions of OnlineState.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "row_state.h"
#include "sirl/online_state.h"

namespace sirl_cuda {
namespace dev {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

// Round to nearest even, as torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Elements per 16-byte vector.
template <typename T>
struct VecWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

// Elements before p reaches a 16-byte boundary (p is element-aligned, checked on the host).
template <typename T>
__device__ __forceinline__ int64_t head_elems(const void* p) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  return static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(T));
}

// Loads one 16-byte vector (read-only path) into x[offset, offset + VecWidth) as fp32.
template <typename T, int kN>
__device__ __forceinline__ void load_vector(const uint4* src, float (&x)[kN], int offset) {
  const uint4 raw = __ldg(src);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VecWidth<T>::value; ++i) x[offset + i] = to_float<T>(e[i]);
}

__device__ __forceinline__ sirl::OnlineState shfl_down_state(sirl::OnlineState s, int offset) {
  sirl::OnlineState o;
  o.max = __shfl_down_sync(0xffffffffu, s.max, offset);
  o.sumexp = __shfl_down_sync(0xffffffffu, s.sumexp, offset);
  o.wsum = __shfl_down_sync(0xffffffffu, s.wsum, offset);
  return o;
}

__device__ __forceinline__ sirl::ExtState shfl_down_state(sirl::ExtState s, int offset) {
  sirl::ExtState o;
  o.s = shfl_down_state(s.s, offset);
  o.x.count = __shfl_down_sync(0xffffffffu, s.x.count, offset);
  o.x.dsum = __shfl_down_sync(0xffffffffu, s.x.dsum, offset);
  o.x.qsum = __shfl_down_sync(0xffffffffu, s.x.qsum, offset);
  return o;
}

__device__ __forceinline__ sirl::OnlineState empty_like(sirl::OnlineState) { return sirl::empty_state(); }
__device__ __forceinline__ sirl::ExtState empty_like(sirl::ExtState) { return sirl::ext_empty_state(); }

// Tree reduction within a warp (fixed order: deterministic); lane 0 holds the result. States keep raw maxima:
// merged with sirl::merge_scaled (inv_t). State: sirl::OnlineState, or sirl::ExtState (with the extras' sums).
template <typename State>
__device__ __forceinline__ State warp_reduce(State s, float inv_t) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = sirl::merge_scaled(s, shfl_down_state(s, offset), inv_t);
  return s;
}

// Block reduction (kThreads a multiple of 32, at most 1024); thread 0 holds the result. Starts with a barrier
// so the shared scratch may be reused by consecutive calls in a grid-stride loop.
template <int kThreads, typename State>
__device__ __forceinline__ State block_reduce(State s, float inv_t) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
  constexpr int kWarps = kThreads / 32;
  __shared__ State scratch[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();
  s = warp_reduce(s, inv_t);
  if (kWarps == 1) return s;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? scratch[lane] : empty_like(s);
    s = warp_reduce(s, inv_t);
  }
  return s;
}

}  // namespace dev
}  // namespace sirl_cuda
