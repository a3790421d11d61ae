// Forward: one pass over each row (or each vocabulary segment of a row, split-V) accumulating a per-thread online
// softmax state in raw units (row_state.h), reduced across the block once with sirl::merge_scaled; a second
// deterministic kernel merges split-V partial states in a fixed order (no atomics). States keep the raw max (the
// row stats are (raw max, log sumexp): the backward forms (x - max) / T - log sumexp from them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "device_utils.cuh"
#include "internal.h"
#include "row_state.h"
#include "sirl/online_state.h"
#include "sirl_cuda.h"

namespace sirl_cuda {
namespace {

constexpr int kForwardThreads = 256;
constexpr int kMergeThreads = 128;

// Thread-strided state of row[lo, hi), in raw units (row_state.h: RawState): a scalar head up to the first 16-byte
// boundary, then two 16-byte vectors per thread and iteration (2 x kVec logits: one rescale, then an exp2 each; no
// shuffle or barrier in the loop), one vector for the remainder, a scalar tail. Returned as the header's state
// with the raw max (raw_to_scaled), for the block reduction with sirl::merge_scaled.
// kExtras: the specialised instantiation keeping the self-certainty and varentropy sums too (RawExtState ->
// sirl::ExtState); the plain one (RawState -> sirl::OnlineState) is the same code as without them.
template <bool kExtras>
using RawOf = typename std::conditional<kExtras, RawExtState, RawState>::type;
template <bool kExtras>
using StateOf = typename std::conditional<kExtras, sirl::ExtState, sirl::OnlineState>::type;

template <typename T, int kThreads, bool kExtras>
__device__ __forceinline__ StateOf<kExtras> segment_state(const T* row, int64_t lo, int64_t hi, float inv_t) {
  constexpr int kVec = dev::VecWidth<T>::value;
  const float k = inv_t * kLog2e;
  RawOf<kExtras> st;
  if constexpr (kExtras) st = raw_ext_empty();
  else st = raw_empty();
  const T* p = row + lo;
  const int64_t n = hi - lo;
  const int64_t head = dev::min64(dev::head_elems<T>(p), n);
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    const float x[1] = {dev::to_float<T>(p[i])};
    st = raw_update<1>(st, x, k);
  }
  const int64_t nvec = (n - head) / kVec;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  int64_t v = threadIdx.x;
  for (; v + kThreads < nvec; v += 2 * kThreads) {
    float x[2 * kVec];
    dev::load_vector<T>(pv + v, x, 0);
    dev::load_vector<T>(pv + v + kThreads, x, kVec);
    st = raw_update<2 * kVec>(st, x, k);
  }
  if (v < nvec) {
    float x[kVec];
    dev::load_vector<T>(pv + v, x, 0);
    st = raw_update<kVec>(st, x, k);
  }
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) {
    const float x[1] = {dev::to_float<T>(p[i])};
    st = raw_update<1>(st, x, k);
  }
  return raw_to_scaled(st, inv_t);
}

// The optional outputs (c_api.h: self_certainty, varentropy; each may be null), written by the kExtras kernels.
struct ExtraOutputs {
  float* self_certainty;
  float* varentropy;

  __device__ __forceinline__ void store(int64_t row, const sirl::ExtraResult& r) const {
    if (self_certainty) self_certainty[row] = r.self_certainty;
    if (varentropy) varentropy[row] = r.varentropy;
  }
};

__device__ __forceinline__ sirl::ExtraResult skipped_extras(int64_t column) {
  return column == sirl::kIgnoredRow ? sirl::ignored_extras() : sirl::bad_label_extras();
}

struct Outputs {
  float* logprobs;
  float* entropy;
  float* stats;  // [rows, 2]: max, log sumexp

  __device__ __forceinline__ void store(int64_t row, const sirl::RowResult& r) const {
    logprobs[row] = r.logprob;
    entropy[row] = r.entropy;
    stats[2 * row] = r.max;
    stats[2 * row + 1] = r.log_sum;
  }
};

// A row whose label is ignore_index or outside [0, vocab) is never read: zeros, or NaN (never a wild read).
__device__ __forceinline__ bool skipped_row(int64_t column, sirl::RowResult* result) {
  if (column >= 0) return false;
  *result = column == sirl::kIgnoredRow ? sirl::ignored_row() : sirl::bad_label_row();
  return true;
}

template <typename T>
__device__ __forceinline__ sirl::RowResult finish(sirl::OnlineState st, const T* row, int64_t label, float inv_t) {
  return finish_raw(st, dev::to_float<T>(row[label]), inv_t);
}

// A finished row's outputs: the plain ones, and with extras their two more.
template <typename T>
__device__ __forceinline__ void finish_store(sirl::OnlineState st, const T* row, int64_t label, float inv_t,
                                             int64_t r, Outputs out, ExtraOutputs) {
  out.store(r, finish<T>(st, row, label, inv_t));
}
template <typename T>
__device__ __forceinline__ void finish_store(sirl::ExtState st, const T* row, int64_t label, float inv_t,
                                             int64_t r, Outputs out, ExtraOutputs extra) {
  out.store(r, finish<T>(st.s, row, label, inv_t));
  extra.store(r, sirl::finalize_extras(st.s, st.x));
}

// Work item = (row, segment). With one segment the block finishes the row; otherwise it writes its partial
// state to partial[item] for forward_merge_kernel.
// The extras' outputs come last (unused by the plain instantiation), so the plain kernel's parameters keep their
// offsets.
template <typename T, int kThreads, bool kExtras>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ logits, int64_t rows, int64_t vocab, int64_t row_stride,
                   const int64_t* __restrict__ labels, int64_t label_stride, float inv_t, int64_t ignore_index,
                   int num_splits, int64_t split_len, Outputs out, StateOf<kExtras>* __restrict__ partial,
                   ExtraOutputs extra) {
  const int64_t items = rows * num_splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / num_splits;
    const int64_t seg = item - row * num_splits;
    const int64_t label = sirl::label_column(labels[row * label_stride], vocab, ignore_index);
    sirl::RowResult skipped;
    if (skipped_row(label, &skipped)) {  // uniform across the block
      if (num_splits == 1 && threadIdx.x == 0) {
        out.store(row, skipped);
        if constexpr (kExtras) extra.store(row, skipped_extras(label));
      }
      continue;
    }
    const T* rp = logits + row * row_stride;
    const int64_t lo = seg * split_len;
    const int64_t hi = dev::min64(vocab, lo + split_len);
    StateOf<kExtras> st = segment_state<T, kThreads, kExtras>(rp, lo, hi, inv_t);
    st = dev::block_reduce<kThreads>(st, inv_t);
    if (threadIdx.x == 0) {
      if (num_splits == 1) {
        finish_store<T>(st, rp, label, inv_t, row, out, extra);
      } else {
        partial[item] = st;
      }
    }
  }
}

// Second stage of split-V: one thread per row merges its partial states in segment order 0, 1, ... (fixed,
// so the result is bit-reproducible) and finishes the row.
template <typename T, bool kExtras>
__global__ void __launch_bounds__(kMergeThreads)
    forward_merge_kernel(const T* __restrict__ logits, int64_t rows, int64_t vocab, int64_t row_stride,
                         const int64_t* __restrict__ labels, int64_t label_stride, float inv_t,
                         int64_t ignore_index, int num_splits, const StateOf<kExtras>* __restrict__ partial,
                         Outputs out, ExtraOutputs extra) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kMergeThreads) {
    const int64_t label = sirl::label_column(labels[row * label_stride], vocab, ignore_index);
    sirl::RowResult skipped;
    if (skipped_row(label, &skipped)) {
      out.store(row, skipped);
      if constexpr (kExtras) extra.store(row, skipped_extras(label));
      continue;
    }
    StateOf<kExtras> st;
    if constexpr (kExtras) st = sirl::ext_empty_state();
    else st = sirl::empty_state();
    const StateOf<kExtras>* ps = partial + row * num_splits;
    for (int s = 0; s < num_splits; ++s) st = sirl::merge_scaled(st, ps[s], inv_t);
    finish_store<T>(st, logits + row * row_stride, label, inv_t, row, out, extra);
  }
}

template <typename T, bool kExtras>
sirl::Status launch(const sirl_forward_args& a, int num_splits, void* workspace, cudaStream_t stream) {
  const sirl_rows& in = a.in;
  const float inv_t = sirl::inv_temperature(in);
  const T* logits = static_cast<const T*>(in.logits);
  auto* partial = static_cast<StateOf<kExtras>*>(workspace);
  const int64_t split_len = num_splits > 1 ? forward_split_len(in.vocab, num_splits) : in.vocab;
  const Outputs out{a.logprobs, a.entropy, a.stats};
  const ExtraOutputs extra{a.self_certainty, a.varentropy};
  detail::note_cuda_call();
  forward_kernel<T, kForwardThreads, kExtras>
      <<<detail::grid_for(in.rows * num_splits, 1), kForwardThreads, 0, stream>>>(
          logits, in.rows, in.vocab, in.row_stride, in.labels, in.label_stride, inv_t, in.ignore_index, num_splits,
          split_len, out, num_splits > 1 ? partial : nullptr, extra);
  if (num_splits > 1) {
    forward_merge_kernel<T, kExtras><<<detail::grid_for(in.rows, kMergeThreads), kMergeThreads, 0, stream>>>(
        logits, in.rows, in.vocab, in.row_stride, in.labels, in.label_stride, inv_t, in.ignore_index, num_splits,
        partial, out, extra);
  }
  return detail::cuda_status("sirl_logits_forward", "kernel launch", cudaGetLastError());
}

}  // namespace

sirl::Status launch_logits_forward(const sirl_forward_args& args, int num_splits, void* workspace,
                                   cudaStream_t stream) {
  const bool extras = sirl::wants_extras(args);  // the specialised kernels keep their sums
  switch (args.in.dtype) {
    case SIRL_FLOAT32:
      return extras ? launch<float, true>(args, num_splits, workspace, stream)
                    : launch<float, false>(args, num_splits, workspace, stream);
    case SIRL_BFLOAT16:
      return extras ? launch<__nv_bfloat16, true>(args, num_splits, workspace, stream)
                    : launch<__nv_bfloat16, false>(args, num_splits, workspace, stream);
    default:
      return extras ? launch<__half, true>(args, num_splits, workspace, stream)
                    : launch<__half, false>(args, num_splits, workspace, stream);
  }
}

sirl::Status kernel_image_status() {
  cudaFuncAttributes attr;
  detail::note_cuda_call();
  return detail::cuda_status("sirl_probe", "no kernel image of this build runs on this device (cudaFuncGetAttributes)",
                             cudaFuncGetAttributes(&attr, forward_kernel<float, kForwardThreads, false>));
}

}  // namespace sirl_cuda
