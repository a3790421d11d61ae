// sirl-kernels CUDA backend: torch-free launchers for the fused log-prob + entropy kernels.
//
// Everything here takes raw device pointers, sizes, int64 strides (in elements) and a cudaStream_t, and
// returns a Status. Every argument check runs on the host BEFORE any CUDA runtime call, so a bad call never
// touches the device (the host-only test_cuda_launchers relies on this). The torch binding (binding.cpp) is
// a thin layer over these functions.
//
// Math (see csrc/include/sirl/online_state.h, shared with the CPU backend): z = x / T per row,
//   lse = log sum exp z, entropy = -sum p log p, logprob = z_y - lse;
//   backward: dx_i = [g_lp (1[i = y] - p_i) - g_H p_i (z_i - lse + H)] / T.
// Rows whose label equals ignore_index get logprob = entropy = lse = 0 and an all-zero gradient (the lse of
// an ignored row is never read: its gradient is zero whatever lse says).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace sirl_cuda {

// Input element types. Passed as int so that an out-of-range value can be reported, not silently cast.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,  // null pointer, negative size, bad stride, V = 0 with rows, bad temperature, ...
  kUnsupportedDtype = 2,
  kCudaError = 3,  // a launch or runtime error, message from cudaGetErrorString
};

struct Status {
  Code code = Code::kOk;
  std::string message;
  bool ok() const { return code == Code::kOk; }
};

const char* code_name(Code code);
const char* dtype_name(int dtype);  // "float32", "bfloat16", "float16" or "unknown"
size_t dtype_size(int dtype);       // 0 for an unsupported dtype

// ---------------------------------------------------------------------------------------------------------------
// Forward: logits [rows, vocab] (row stride in elements, unit stride along the vocabulary) ->
// logprobs, entropy, lse (fp32, contiguous [rows]).
// ---------------------------------------------------------------------------------------------------------------
struct ForwardParams {
  const void* logits = nullptr;
  int dtype = kFloat32;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;  // elements between consecutive rows; 0 (a broadcast row) is allowed for reading
  const int64_t* labels = nullptr;
  int64_t label_stride = 1;  // elements; >= 0
  double temperature = 1.0;  // finite, > 0; the kernels multiply by (float)(1 / temperature)
  int64_t ignore_index = -100;
  float* logprobs = nullptr;
  float* entropy = nullptr;
  float* lse = nullptr;
  // Split-V: 0 chooses (more than one split only when rows are too few to fill the GPU); >= 1 forces that
  // many vocabulary segments (clamped so that no segment is empty). More than one split needs a workspace of
  // forward_workspace_bytes(rows, splits) bytes; when the automatic choice finds too small a workspace it
  // falls back to one split, a forced choice reports kInvalidArgument.
  int num_splits = 0;
  int num_sms = 0;  // multiprocessors of the device, for the automatic split; 0 queries the current device
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

constexpr int kMaxSplits = 256;

// The split count the forward uses for these sizes (pure host arithmetic, no CUDA call). requested >= 1 is
// clamped to [1, min(kMaxSplits, segments of at least 8 elements)]; requested == 0 picks automatically.
int forward_num_splits(int64_t rows, int64_t vocab, int num_sms, int requested);
// Elements per vocabulary segment for a given split count (a multiple of 8, so segments stay 16-byte aligned
// whenever rows are).
int64_t forward_split_len(int64_t vocab, int num_splits);
// Workspace bytes for the partial states of a split forward (0 when num_splits <= 1).
size_t forward_workspace_bytes(int64_t rows, int num_splits);

Status logits_forward(const ForwardParams& params, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// Backward: gradient of sum(g_lp * logprob + g_H * entropy) w.r.t. the logits, written in the logits' dtype.
// grad_logits may equal logits (in place) provided grad_row_stride == row_stride; any other overlap is an
// error the launcher cannot see, so do not do it.
// ---------------------------------------------------------------------------------------------------------------
struct BackwardParams {
  const float* grad_logprobs = nullptr;  // [rows], contiguous fp32
  const float* grad_entropy = nullptr;   // [rows], contiguous fp32
  const void* logits = nullptr;
  int dtype = kFloat32;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;
  const int64_t* labels = nullptr;
  int64_t label_stride = 1;
  const float* lse = nullptr;      // [rows], from the forward
  const float* entropy = nullptr;  // [rows], from the forward
  double temperature = 1.0;
  int64_t ignore_index = -100;
  void* grad_logits = nullptr;  // same dtype as logits
  int64_t grad_row_stride = 0;  // >= vocab when rows > 1
};

Status logits_backward(const BackwardParams& params, cudaStream_t stream);

// How many CUDA runtime calls the launchers have made in this process (for the host-only tests, which assert
// that rejected or empty calls never reach the device).
int64_t cuda_runtime_calls();

}  // namespace sirl_cuda
