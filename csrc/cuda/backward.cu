// Backward: one pass writing d logits for both outputs (logprob and entropy), optionally in place.
// Work item = (row, vocabulary segment); every element is read and written by the same thread, which is what
// makes grad_logits == logits safe (plain loads, not the read-only __ldg path, and no __restrict__ on them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "device_utils.cuh"
#include "internal.h"
#include "sirl/online_state.h"
#include "sirl_cuda.h"

namespace sirl_cuda {
namespace {

constexpr int kBackwardThreads = 256;
constexpr int64_t kBackwardSegment = 32768;  // elements per work item (a multiple of 8)

struct RowGrad {
  int64_t label;
  float lse;
  float entropy;
  float g_lp;
  float g_h;
  float inv_t;
};

template <typename T>
__device__ __forceinline__ T grad_elem(int64_t i, T x, const RowGrad& r) {
  const float z = dev::to_float<T>(x) * r.inv_t;
  const float g = (i == r.label) ? sirl::grad_label(z, r.lse, r.entropy, r.g_lp, r.g_h, r.inv_t)
                                 : sirl::grad_nonlabel(z, r.lse, r.entropy, r.g_lp, r.g_h, r.inv_t);
  return dev::from_float<T>(g);
}

// out[lo, hi) = d/dx of the row's objective; vector path when in and out share their 16-byte misalignment.
template <typename T, int kThreads>
__device__ __forceinline__ void grad_segment(const T* in, T* out, int64_t lo, int64_t hi, const RowGrad& r) {
  constexpr int kVec = dev::VecWidth<T>::value;
  const int64_t n = hi - lo;
  const T* pin = in + lo;
  T* pout = out + lo;
  const bool vec_ok = ((reinterpret_cast<uintptr_t>(pin) ^ reinterpret_cast<uintptr_t>(pout)) & 15u) == 0;
  const int64_t head = vec_ok ? dev::min64(dev::head_elems<T>(pout), n) : n;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) pout[i] = grad_elem<T>(lo + i, pin[i], r);
  const int64_t nvec = (n - head) / kVec;
  const uint4* vin = reinterpret_cast<const uint4*>(pin + head);
  uint4* vout = reinterpret_cast<uint4*>(pout + head);
  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
    const uint4 raw = vin[v];
    const T* x = reinterpret_cast<const T*>(&raw);
    uint4 res;
    T* g = reinterpret_cast<T*>(&res);
    const int64_t base = lo + head + v * kVec;
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = grad_elem<T>(base + k, x[k], r);
    vout[v] = res;
  }
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) {
    pout[i] = grad_elem<T>(lo + i, pin[i], r);
  }
}

// Ignored rows: zeros, without reading the logits.
template <typename T, int kThreads>
__device__ __forceinline__ void zero_segment(T* out, int64_t lo, int64_t hi) {
  constexpr int kVec = dev::VecWidth<T>::value;
  const int64_t n = hi - lo;
  T* pout = out + lo;
  const T zero = dev::from_float<T>(0.0f);
  const int64_t head = dev::min64(dev::head_elems<T>(pout), n);
  for (int64_t i = threadIdx.x; i < head; i += kThreads) pout[i] = zero;
  const int64_t nvec = (n - head) / kVec;
  uint4* vout = reinterpret_cast<uint4*>(pout + head);
  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) vout[v] = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) pout[i] = zero;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy, const T* logits,
                    int64_t rows, int64_t vocab, int64_t row_stride, const int64_t* __restrict__ labels,
                    int64_t label_stride, const float* __restrict__ lse, const float* __restrict__ entropy,
                    float inv_t, int64_t ignore_index, T* grad, int64_t grad_row_stride, int64_t segments,
                    int64_t seg_len) {
  const int64_t items = rows * segments;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / segments;
    const int64_t lo = (item - row * segments) * seg_len;
    const int64_t hi = dev::min64(vocab, lo + seg_len);
    T* out = grad + row * grad_row_stride;
    const int64_t label = labels[row * label_stride];
    if (label == ignore_index) {
      zero_segment<T, kThreads>(out, lo, hi);
      continue;
    }
    const RowGrad r{label, lse[row], entropy[row], grad_logprobs[row], grad_entropy[row], inv_t};
    grad_segment<T, kThreads>(logits + row * row_stride, out, lo, hi, r);
  }
}

template <typename T>
Status launch_backward(const BackwardParams& p, cudaStream_t stream) {
  const float inv_t = static_cast<float>(1.0 / p.temperature);
  const int64_t segments = (p.vocab + kBackwardSegment - 1) / kBackwardSegment;
  const int64_t seg_len = segments == 1 ? p.vocab : kBackwardSegment;
  const int64_t items = p.rows * segments;
  const unsigned grid = static_cast<unsigned>(std::min(items, detail::kMaxGridBlocks));
  detail::note_cuda_call();
  backward_kernel<T, kBackwardThreads><<<grid, kBackwardThreads, 0, stream>>>(
      p.grad_logprobs, p.grad_entropy, static_cast<const T*>(p.logits), p.rows, p.vocab, p.row_stride, p.labels,
      p.label_stride, p.lse, p.entropy, inv_t, p.ignore_index, static_cast<T*>(p.grad_logits), p.grad_row_stride,
      segments, seg_len);
  return detail::cuda_status("sirl_cuda::logits_backward", "kernel launch", cudaGetLastError());
}

}  // namespace

Status logits_backward(const BackwardParams& p, cudaStream_t stream) {
  using detail::invalid;
  const char* fn = "sirl_cuda::logits_backward";
  if (p.rows < 0) return invalid(fn, "rows must be >= 0, got " + std::to_string(p.rows));
  if (p.vocab < 0) return invalid(fn, "vocab must be >= 0, got " + std::to_string(p.vocab));
  if (!detail::dtype_supported(p.dtype)) {
    return Status{Code::kUnsupportedDtype,
                  std::string(fn) + ": dtype code " + std::to_string(p.dtype) +
                      " is not supported (float32 = 0, bfloat16 = 1, float16 = 2)"};
  }
  if (p.rows == 0) return detail::ok();
  if (p.vocab == 0) return invalid(fn, "vocab is 0 (empty vocabulary) with " + std::to_string(p.rows) + " rows");
  if (p.logits == nullptr) return invalid(fn, "logits is a null pointer");
  if (p.grad_logits == nullptr) return invalid(fn, "grad_logits is a null pointer");
  if (p.labels == nullptr) return invalid(fn, "labels is a null pointer");
  if (p.grad_logprobs == nullptr || p.grad_entropy == nullptr) {
    return invalid(fn, "grad_logprobs or grad_entropy is a null pointer");
  }
  if (p.lse == nullptr || p.entropy == nullptr) return invalid(fn, "lse or entropy is a null pointer");
  const size_t esize = dtype_size(p.dtype);
  if (!detail::aligned_to(p.logits, esize) || !detail::aligned_to(p.grad_logits, esize)) {
    return invalid(fn, std::string("logits or grad_logits is not aligned to its ") + dtype_name(p.dtype) +
                           " elements");
  }
  if (!detail::aligned_to(p.labels, sizeof(int64_t))) return invalid(fn, "labels pointer is not 8-byte aligned");
  if (!detail::aligned_to(p.grad_logprobs, 4) || !detail::aligned_to(p.grad_entropy, 4) ||
      !detail::aligned_to(p.lse, 4) || !detail::aligned_to(p.entropy, 4)) {
    return invalid(fn, "a per-row fp32 pointer is not 4-byte aligned");
  }
  if (p.row_stride < 0) return invalid(fn, "row_stride must be >= 0, got " + std::to_string(p.row_stride));
  if (p.rows > 1 && p.row_stride != 0 && p.row_stride < p.vocab) {
    return invalid(fn, "row_stride " + std::to_string(p.row_stride) + " is smaller than vocab " +
                           std::to_string(p.vocab) + " (rows would overlap)");
  }
  if (p.grad_row_stride < 0 || (p.rows > 1 && p.grad_row_stride < p.vocab)) {
    return invalid(fn, "grad_row_stride " + std::to_string(p.grad_row_stride) + " must be >= vocab " +
                           std::to_string(p.vocab) + " (the gradient rows must not overlap)");
  }
  if (p.grad_logits == p.logits && p.grad_row_stride != p.row_stride) {
    return invalid(fn, "in-place backward (grad_logits == logits) needs grad_row_stride == row_stride, got " +
                           std::to_string(p.grad_row_stride) + " and " + std::to_string(p.row_stride));
  }
  if (p.label_stride < 0) return invalid(fn, "label_stride must be >= 0, got " + std::to_string(p.label_stride));
  if (!detail::extent_fits(p.rows, p.row_stride, p.vocab) || !detail::extent_fits(p.rows, p.grad_row_stride, p.vocab) ||
      !detail::extent_fits(p.rows, p.label_stride, 1)) {
    return invalid(fn, "rows x stride overflows int64");
  }
  if (!detail::temperature_ok(p.temperature)) {
    return invalid(fn, "temperature must be finite and > 0, got " + std::to_string(p.temperature));
  }
  switch (p.dtype) {
    case kFloat32:
      return launch_backward<float>(p, stream);
    case kBFloat16:
      return launch_backward<__nv_bfloat16>(p, stream);
    default:
      return launch_backward<__half>(p, stream);
  }
}

}  // namespace sirl_cuda
