// Forward: one pass over each row (or each vocabulary segment of a row, split-V) accumulating the online
// softmax state, reduced across the block with sirl::merge; a second deterministic kernel merges split-V
// partial states in a fixed order (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "device_utils.cuh"
#include "internal.h"
#include "row_state.h"
#include "sirl/online_state.h"
#include "sirl_cuda.h"

namespace sirl_cuda {
namespace {

constexpr int kForwardThreads = 256;
constexpr int kMergeThreads = 128;

// Thread-strided state of row[lo, hi): a scalar head up to the first 16-byte boundary, 16-byte vectors (two
// in flight per thread), a scalar tail.
template <typename T, int kThreads>
__device__ __forceinline__ sirl::OnlineState segment_state(const T* row, int64_t lo, int64_t hi, float inv_t) {
  constexpr int kVec = dev::VecWidth<T>::value;
  sirl::OnlineState st = sirl::empty_state();
  const T* p = row + lo;
  const int64_t n = hi - lo;
  const int64_t head = dev::min64(dev::head_elems<T>(p), n);
  for (int64_t i = threadIdx.x; i < head; i += kThreads) st = sirl::update(st, dev::to_float<T>(p[i]) * inv_t);
  const int64_t nvec = (n - head) / kVec;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  int64_t v = threadIdx.x;
  for (; v + kThreads < nvec; v += 2 * kThreads) {
    float a[kVec];
    float b[kVec];
    dev::load_scaled<T>(pv + v, inv_t, a);
    dev::load_scaled<T>(pv + v + kThreads, inv_t, b);
    st = sirl::merge(st, vector_state<kVec>(a));
    st = sirl::merge(st, vector_state<kVec>(b));
  }
  if (v < nvec) {
    float a[kVec];
    dev::load_scaled<T>(pv + v, inv_t, a);
    st = sirl::merge(st, vector_state<kVec>(a));
  }
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) {
    st = sirl::update(st, dev::to_float<T>(p[i]) * inv_t);
  }
  return st;
}

__device__ __forceinline__ void store_row(float* logprobs, float* entropy, float* lse, int64_t row, RowOutputs r) {
  logprobs[row] = r.logprob;
  entropy[row] = r.entropy;
  lse[row] = r.lse;
}

template <typename T>
__device__ __forceinline__ RowOutputs finish(sirl::OnlineState st, const T* row, int64_t vocab, int64_t label,
                                             float inv_t) {
  if (label < 0 || label >= vocab) return bad_label_row();
  return finish_row(st, dev::to_float<T>(row[label]) * inv_t);
}

// Work item = (row, segment). With one segment the block finishes the row; otherwise it writes its partial
// state to partial[item] for forward_merge_kernel.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ logits, int64_t rows, int64_t vocab, int64_t row_stride,
                   const int64_t* __restrict__ labels, int64_t label_stride, float inv_t, int64_t ignore_index,
                   int num_splits, int64_t split_len, float* __restrict__ logprobs, float* __restrict__ entropy,
                   float* __restrict__ lse, sirl::OnlineState* __restrict__ partial) {
  const int64_t items = rows * num_splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / num_splits;
    const int64_t seg = item - row * num_splits;
    const int64_t label = labels[row * label_stride];
    if (label == ignore_index) {  // uniform across the block
      if (num_splits == 1 && threadIdx.x == 0) store_row(logprobs, entropy, lse, row, ignored_row());
      continue;
    }
    const T* rp = logits + row * row_stride;
    const int64_t lo = seg * split_len;
    const int64_t hi = dev::min64(vocab, lo + split_len);
    sirl::OnlineState st = segment_state<T, kThreads>(rp, lo, hi, inv_t);
    st = dev::block_reduce<kThreads>(st);
    if (threadIdx.x == 0) {
      if (num_splits == 1) {
        store_row(logprobs, entropy, lse, row, finish<T>(st, rp, vocab, label, inv_t));
      } else {
        partial[item] = st;
      }
    }
  }
}

// Second stage of split-V: one thread per row merges its partial states in segment order 0, 1, ... (fixed,
// so the result is bit-reproducible) and finishes the row.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    forward_merge_kernel(const T* __restrict__ logits, int64_t rows, int64_t vocab, int64_t row_stride,
                         const int64_t* __restrict__ labels, int64_t label_stride, float inv_t,
                         int64_t ignore_index, int num_splits, const sirl::OnlineState* __restrict__ partial,
                         float* __restrict__ logprobs, float* __restrict__ entropy, float* __restrict__ lse) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kMergeThreads) {
    const int64_t label = labels[row * label_stride];
    if (label == ignore_index) {
      store_row(logprobs, entropy, lse, row, ignored_row());
      continue;
    }
    sirl::OnlineState st = sirl::empty_state();
    const sirl::OnlineState* ps = partial + row * num_splits;
    for (int s = 0; s < num_splits; ++s) st = sirl::merge(st, ps[s]);
    store_row(logprobs, entropy, lse, row, finish<T>(st, logits + row * row_stride, vocab, label, inv_t));
  }
}

unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, detail::kMaxGridBlocks)));
}

template <typename T>
Status launch_forward(const ForwardParams& p, int num_splits, int64_t split_len, cudaStream_t stream) {
  const float inv_t = static_cast<float>(1.0 / p.temperature);
  const T* logits = static_cast<const T*>(p.logits);
  auto* partial = static_cast<sirl::OnlineState*>(p.workspace);
  detail::note_cuda_call();
  forward_kernel<T, kForwardThreads><<<grid_for(p.rows * num_splits, 1), kForwardThreads, 0, stream>>>(
      logits, p.rows, p.vocab, p.row_stride, p.labels, p.label_stride, inv_t, p.ignore_index, num_splits,
      split_len, p.logprobs, p.entropy, p.lse, num_splits > 1 ? partial : nullptr);
  if (num_splits > 1) {
    forward_merge_kernel<T><<<grid_for(p.rows, kMergeThreads), kMergeThreads, 0, stream>>>(
        logits, p.rows, p.vocab, p.row_stride, p.labels, p.label_stride, inv_t, p.ignore_index, num_splits, partial,
        p.logprobs, p.entropy, p.lse);
  }
  return detail::cuda_status("sirl_cuda::logits_forward", "kernel launch", cudaGetLastError());
}

}  // namespace

Status logits_forward(const ForwardParams& p, cudaStream_t stream) {
  using detail::invalid;
  const char* fn = "sirl_cuda::logits_forward";
  if (p.rows < 0) return invalid(fn, "rows must be >= 0, got " + std::to_string(p.rows));
  if (p.vocab < 0) return invalid(fn, "vocab must be >= 0, got " + std::to_string(p.vocab));
  if (!detail::dtype_supported(p.dtype)) {
    return Status{Code::kUnsupportedDtype,
                  std::string(fn) + ": dtype code " + std::to_string(p.dtype) +
                      " is not supported (float32 = 0, bfloat16 = 1, float16 = 2)"};
  }
  if (p.rows == 0) return detail::ok();  // nothing to do; pointers of empty tensors may be null
  if (p.vocab == 0) return invalid(fn, "vocab is 0 (empty vocabulary) with " + std::to_string(p.rows) + " rows");
  if (p.logits == nullptr) return invalid(fn, "logits is a null pointer");
  if (p.labels == nullptr) return invalid(fn, "labels is a null pointer");
  if (p.logprobs == nullptr || p.entropy == nullptr || p.lse == nullptr) {
    return invalid(fn, "an output pointer (logprobs, entropy or lse) is null");
  }
  const size_t esize = dtype_size(p.dtype);
  if (!detail::aligned_to(p.logits, esize)) {
    return invalid(fn, std::string("logits pointer is not aligned to its ") + dtype_name(p.dtype) + " elements");
  }
  if (!detail::aligned_to(p.labels, sizeof(int64_t))) return invalid(fn, "labels pointer is not 8-byte aligned");
  if (!detail::aligned_to(p.logprobs, 4) || !detail::aligned_to(p.entropy, 4) || !detail::aligned_to(p.lse, 4)) {
    return invalid(fn, "an output pointer is not 4-byte aligned");
  }
  if (p.row_stride < 0) return invalid(fn, "row_stride must be >= 0, got " + std::to_string(p.row_stride));
  if (p.rows > 1 && p.row_stride != 0 && p.row_stride < p.vocab) {
    return invalid(fn, "row_stride " + std::to_string(p.row_stride) + " is smaller than vocab " +
                           std::to_string(p.vocab) + " (rows would overlap)");
  }
  if (p.label_stride < 0) return invalid(fn, "label_stride must be >= 0, got " + std::to_string(p.label_stride));
  if (!detail::extent_fits(p.rows, p.row_stride, p.vocab) || !detail::extent_fits(p.rows, p.label_stride, 1)) {
    return invalid(fn, "rows x stride overflows int64");
  }
  if (!detail::temperature_ok(p.temperature)) {
    return invalid(fn, "temperature must be finite and > 0, got " + std::to_string(p.temperature));
  }
  if (p.num_splits < 0 || p.num_splits > kMaxSplits) {
    return invalid(fn, "num_splits must be in [0, " + std::to_string(kMaxSplits) + "], got " +
                           std::to_string(p.num_splits));
  }
  if (p.workspace != nullptr && !detail::aligned_to(p.workspace, alignof(sirl::OnlineState))) {
    return invalid(fn, "workspace is not 4-byte aligned");
  }

  int num_sms = p.num_sms;
  if (p.num_splits == 0 && num_sms <= 0) {
    int device = 0;
    detail::note_cuda_call();
    Status st = detail::cuda_status(fn, "cudaGetDevice", cudaGetDevice(&device));
    if (!st.ok()) return st;
    st = detail::cuda_status(fn, "cudaDeviceGetAttribute",
                             cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
    if (!st.ok()) return st;
  }
  int splits = forward_num_splits(p.rows, p.vocab, num_sms, p.num_splits);
  if (splits > 1 && (p.workspace == nullptr || p.workspace_bytes < forward_workspace_bytes(p.rows, splits))) {
    if (p.num_splits != 0) {
      return invalid(fn, std::to_string(splits) + " splits need a workspace of " +
                             std::to_string(forward_workspace_bytes(p.rows, splits)) + " bytes, got " +
                             std::to_string(p.workspace == nullptr ? 0 : p.workspace_bytes));
    }
    splits = 1;  // automatic choice: fall back to one block per row
  }
  const int64_t split_len = splits > 1 ? forward_split_len(p.vocab, splits) : p.vocab;
  switch (p.dtype) {
    case kFloat32:
      return launch_forward<float>(p, splits, split_len, stream);
    case kBFloat16:
      return launch_forward<__nv_bfloat16>(p, splits, split_len, stream);
    default:
      return launch_forward<__half>(p, splits, split_len, stream);
  }
}

}  // namespace sirl_cuda
