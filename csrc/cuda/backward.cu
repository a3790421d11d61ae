// Backward: one pass writing d logits for both outputs (logprob and entropy), optionally in place.
// Work item = (row, vocabulary segment); every element is read and written by the same thread, which is what
// makes grad_logits == logits safe (plain loads, not the read-only __ldg path, and no __restrict__ on them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "device_utils.cuh"
#include "internal.h"
#include "row_state.h"
#include "sirl/online_state.h"
#include "sirl_cuda.h"

namespace sirl_cuda {
namespace {

constexpr int kBackwardThreads = 256;
constexpr int64_t kBackwardSegment = 32768;  // elements per work item (a multiple of 8)

// The row's constants (row_state.h: GradRow) and what the label's own gradient needs.
struct RowGrad {
  GradRow fast;
  int64_t label;
  float log_sum;
  float entropy;
  float g_lp;
  float g_h;
};

template <typename T>
__device__ __forceinline__ T grad_elem(int64_t i, T x, const RowGrad& r) {
  const float xf = dev::to_float<T>(x);
  const float g = (i == r.label) ? grad_label_raw(xf, r.fast, r.log_sum, r.entropy, r.g_lp, r.g_h)
                                 : grad_nonlabel_fast(xf, r.fast);
  return dev::from_float<T>(g);
}

// out[lo, hi) = d/dx of the row's objective; vector path when in and out share their 16-byte misalignment. The
// vector loop computes every element as a non-label one (grad_nonlabel_fast: no per-element branch, two vectors
// per thread and iteration); the thread whose vectors hold the label reads that logit before its loop and
// rewrites the label's gradient after it, as a scalar. Every element is read and written by one thread, in that
// order, so in place is safe.
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
  // the label's offset in the vector part, owned by the thread that loads its vector (v = threadIdx.x mod kThreads)
  const int64_t label_off = r.label - (lo + head);
  const bool owner = label_off >= 0 && label_off < nvec * kVec && (label_off / kVec) % kThreads == threadIdx.x;
  const float x_label = owner ? dev::to_float<T>(pin[head + label_off]) : 0.0f;
  int64_t v = threadIdx.x;
  for (; v + kThreads < nvec; v += 2 * kThreads) {
    const uint4 raw[2] = {vin[v], vin[v + kThreads]};
    uint4 res[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const T* x = reinterpret_cast<const T*>(&raw[j]);
      T* g = reinterpret_cast<T*>(&res[j]);
#pragma unroll
      for (int k = 0; k < kVec; ++k) g[k] = dev::from_float<T>(grad_nonlabel_fast(dev::to_float<T>(x[k]), r.fast));
    }
    vout[v] = res[0];
    vout[v + kThreads] = res[1];
  }
  if (v < nvec) {
    const uint4 raw = vin[v];
    const T* x = reinterpret_cast<const T*>(&raw);
    uint4 res;
    T* g = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = dev::from_float<T>(grad_nonlabel_fast(dev::to_float<T>(x[k]), r.fast));
    vout[v] = res;
  }
  if (owner) {
    pout[head + label_off] =
        dev::from_float<T>(grad_label_raw(x_label, r.fast, r.log_sum, r.entropy, r.g_lp, r.g_h));
  }
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) {
    pout[i] = grad_elem<T>(lo + i, pin[i], r);
  }
}

// Rows that are not read: zeros for an ignored row, NaN for a label outside [0, vocab).
template <typename T, int kThreads>
__device__ __forceinline__ void fill_segment(T* out, int64_t lo, int64_t hi, float value) {
  constexpr int kVec = dev::VecWidth<T>::value;
  const int64_t n = hi - lo;
  T* pout = out + lo;
  const T fill = dev::from_float<T>(value);
  uint4 fill_vec;
  T* lanes = reinterpret_cast<T*>(&fill_vec);
#pragma unroll
  for (int k = 0; k < kVec; ++k) lanes[k] = fill;
  const int64_t head = dev::min64(dev::head_elems<T>(pout), n);
  for (int64_t i = threadIdx.x; i < head; i += kThreads) pout[i] = fill;
  const int64_t nvec = (n - head) / kVec;
  uint4* vout = reinterpret_cast<uint4*>(pout + head);
  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) vout[v] = fill_vec;
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) pout[i] = fill;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy, const T* logits,
                    int64_t rows, int64_t vocab, int64_t row_stride, const int64_t* __restrict__ labels,
                    int64_t label_stride, const float* __restrict__ stats, const float* __restrict__ entropy,
                    float inv_t, int64_t ignore_index, T* grad, int64_t grad_row_stride, int64_t segments,
                    int64_t seg_len) {
  const int64_t items = rows * segments;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / segments;
    const int64_t lo = (item - row * segments) * seg_len;
    const int64_t hi = dev::min64(vocab, lo + seg_len);
    T* out = grad + row * grad_row_stride;
    const int64_t label = sirl::label_column(labels[row * label_stride], vocab, ignore_index);
    if (label < 0) {
      fill_segment<T, kThreads>(out, lo, hi, label == sirl::kIgnoredRow ? 0.0f : NAN);
      continue;
    }
    const float log_sum = stats[2 * row + 1];
    const RowGrad r{grad_row(stats[2 * row], log_sum, entropy[row], grad_logprobs[row], grad_entropy[row], inv_t),
                    label, log_sum, entropy[row], grad_logprobs[row], grad_entropy[row]};
    grad_segment<T, kThreads>(logits + row * row_stride, out, lo, hi, r);
  }
}

template <typename T>
sirl::Status launch(const sirl_backward_args& a, cudaStream_t stream) {
  const sirl_rows& in = a.in;
  const float inv_t = sirl::inv_temperature(in);
  const int64_t segments = (in.vocab + kBackwardSegment - 1) / kBackwardSegment;
  const int64_t seg_len = segments == 1 ? in.vocab : kBackwardSegment;
  detail::note_cuda_call();
  backward_kernel<T, kBackwardThreads><<<detail::grid_for(in.rows * segments, 1), kBackwardThreads, 0, stream>>>(
      a.grad_logprobs, a.grad_entropy, static_cast<const T*>(in.logits), in.rows, in.vocab, in.row_stride,
      in.labels, in.label_stride, a.stats, a.entropy, inv_t, in.ignore_index, static_cast<T*>(a.grad_logits),
      a.grad_row_stride, segments, seg_len);
  return detail::cuda_status("sirl_logits_backward", "kernel launch", cudaGetLastError());
}

}  // namespace

sirl::Status launch_logits_backward(const sirl_backward_args& args, cudaStream_t stream) {
  switch (args.in.dtype) {
    case SIRL_FLOAT32:
      return launch<float>(args, stream);
    case SIRL_BFLOAT16:
      return launch<__nv_bfloat16>(args, stream);
    default:
      return launch<__half>(args, stream);
  }
}

}  // namespace sirl_cuda
