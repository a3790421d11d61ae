// Backward: one pass writing d logits of the backward form (per-row alpha, beta, lam, and gamma, delta in the
// specialised kernels; online_state.h), optionally in place.
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
  float alpha;
  float beta;
  float lam;
};

// The specialised kernels' row: RowGrad with the gamma and delta terms (row_state.h: GradTerms).
struct RowGradTerms : RowGrad {
  GradTerms terms;
  float gamma;
  float delta;
};

// Per element, non-label and label, for the plain row and the one with terms.
__device__ __forceinline__ float grad_nonlabel_of(float x, const RowGrad& r) { return grad_nonlabel_fast(x, r.fast); }
__device__ __forceinline__ float grad_nonlabel_of(float x, const RowGradTerms& r) {
  return grad_nonlabel_terms(x, r.fast, r.terms);
}
__device__ __forceinline__ float grad_label_of(float x, const RowGrad& r) {
  return grad_label_raw(x, r.fast, r.log_sum, r.alpha, r.beta, r.lam);
}
__device__ __forceinline__ float grad_label_of(float x, const RowGradTerms& r) {
  return grad_label_raw(x, r.fast, r.log_sum, r.alpha, r.beta, r.lam, r.gamma, r.delta);
}

template <typename T, typename Row>
__device__ __forceinline__ T grad_elem(int64_t i, T x, const Row& r) {
  const float xf = dev::to_float<T>(x);
  const float g = (i == r.label) ? grad_label_of(xf, r) : grad_nonlabel_of(xf, r);
  return dev::from_float<T>(g);
}

// out[lo, hi) = d/dx of the row's objective; vector path when in and out share their 16-byte misalignment. The
// vector loop computes every element as a non-label one (grad_nonlabel_fast: no per-element branch, two vectors
// per thread and iteration); the thread whose vectors hold the label reads that logit before its loop and
// rewrites the label's gradient after it, as a scalar. Every element is read and written by one thread, in that
// order, so in place is safe.
template <typename T, int kThreads, typename Row>
__device__ __forceinline__ void grad_segment(const T* in, T* out, int64_t lo, int64_t hi, const Row& r) {
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
      for (int k = 0; k < kVec; ++k) g[k] = dev::from_float<T>(grad_nonlabel_of(dev::to_float<T>(x[k]), r));
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
    for (int k = 0; k < kVec; ++k) g[k] = dev::from_float<T>(grad_nonlabel_of(dev::to_float<T>(x[k]), r));
    vout[v] = res;
  }
  if (owner) {
    pout[head + label_off] = dev::from_float<T>(grad_label_of(x_label, r));
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

// kTerms: the specialised instantiation with gamma and delta (either may be null: 0); the plain one never reads
// them (they come last, so its other parameters keep their offsets).
template <typename T, int kThreads, bool kTerms>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const float* __restrict__ alpha, const float* __restrict__ beta, const float* __restrict__ lam,
                    const T* logits,
                    int64_t rows, int64_t vocab, int64_t row_stride, const int64_t* __restrict__ labels,
                    int64_t label_stride, const float* __restrict__ stats,
                    float inv_t, int64_t ignore_index, T* grad, int64_t grad_row_stride, int64_t segments,
                    int64_t seg_len, const float* __restrict__ gamma, const float* __restrict__ delta) {
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
    const float a = alpha[row], b = beta[row];
    const RowGrad r{grad_row(stats[2 * row], log_sum, a, b, inv_t), label, log_sum, a, b, lam[row]};
    if constexpr (kTerms) {
      const float g = gamma ? gamma[row] : 0.0f, d = delta ? delta[row] : 0.0f;
      const RowGradTerms rt{r, GradTerms{log_sum, a, b, g, d * inv_t}, g, d};
      grad_segment<T, kThreads>(logits + row * row_stride, out, lo, hi, rt);
    } else {
      grad_segment<T, kThreads>(logits + row * row_stride, out, lo, hi, r);
    }
  }
}

template <typename T, bool kTerms>
sirl::Status launch(const sirl_backward_args& a, cudaStream_t stream) {
  const sirl_rows& in = a.in;
  const float inv_t = sirl::inv_temperature(in);
  const int64_t segments = (in.vocab + kBackwardSegment - 1) / kBackwardSegment;
  const int64_t seg_len = segments == 1 ? in.vocab : kBackwardSegment;
  detail::note_cuda_call();
  backward_kernel<T, kBackwardThreads, kTerms>
      <<<detail::grid_for(in.rows * segments, 1), kBackwardThreads, 0, stream>>>(
          a.alpha, a.beta, a.lam, static_cast<const T*>(in.logits), in.rows, in.vocab, in.row_stride, in.labels,
          in.label_stride, a.stats, inv_t, in.ignore_index, static_cast<T*>(a.grad_logits),
          a.grad_row_stride, segments, seg_len, a.gamma, a.delta);
  return detail::cuda_status("sirl_logits_backward", "kernel launch", cudaGetLastError());
}

}  // namespace

sirl::Status launch_logits_backward(const sirl_backward_args& args, cudaStream_t stream) {
  const bool terms = sirl::has_extra_terms(args);  // gamma / delta: the specialised kernels
  switch (args.in.dtype) {
    case SIRL_FLOAT32:
      return terms ? launch<float, true>(args, stream) : launch<float, false>(args, stream);
    case SIRL_BFLOAT16:
      return terms ? launch<__nv_bfloat16, true>(args, stream) : launch<__nv_bfloat16, false>(args, stream);
    default:
      return terms ? launch<__half, true>(args, stream) : launch<__half, false>(args, stream);
  }
}

}  // namespace sirl_cuda
