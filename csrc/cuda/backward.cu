// Backward: one pass writing d logits for both outputs (logprob and entropy), optionally in place.
// Work item = (row, vocabulary segment); every element is read and written by the same thread, which is what
// makes grad_logits == logits safe (plain loads, not the read-only __ldg path, and no __restrict__ on them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
  float max;
  float log_sum;
  float entropy;
  float g_lp;
  float g_h;
  float inv_t;
};

template <typename T>
__device__ __forceinline__ T grad_elem(int64_t i, T x, const RowGrad& r) {
  const float logp = sirl::log_prob(dev::to_float<T>(x) * r.inv_t, r.max, r.log_sum);
  const float g = (i == r.label) ? sirl::grad_label(logp, r.entropy, r.g_lp, r.g_h, r.inv_t)
                                 : sirl::grad_nonlabel(logp, r.entropy, r.g_lp, r.g_h, r.inv_t);
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
    const RowGrad r{label, stats[2 * row], stats[2 * row + 1], entropy[row], grad_logprobs[row], grad_entropy[row],
                    inv_t};
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
