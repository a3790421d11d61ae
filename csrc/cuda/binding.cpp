// Thin torch binding of the CUDA launchers: ops in the `sirl_kernels_cuda` namespace, CUDA dispatch key.
// Built into sirl_kernels._C_cuda by setup.py only where a CUDA toolkit and CUDA-enabled torch exist.
//
//   logits_forward(logits [N, V], labels [N] int64, temperature, ignore_index, num_splits=0)
//     -> (logprobs, entropy, lse)
//   logits_backward(g_lp, g_h, logits, labels, lse, entropy, temperature, ignore_index) -> grad [N, V]
//   logits_backward_inplace(g_lp, g_h, logits!, labels, lse, entropy, temperature, ignore_index) -> ()
//     (writes the gradient over the logits; the fused-linear backward uses it on its chunk buffer)
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <tuple>

#include "sirl_cuda.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return sirl_cuda::kFloat32;
    case at::kBFloat16:
      return sirl_cuda::kBFloat16;
    case at::kHalf:
      return sirl_cuda::kFloat16;
    default:
      TORCH_CHECK(false, "sirl_kernels_cuda: logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda(), "sirl_kernels_cuda: logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "sirl_kernels_cuda: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "sirl_kernels_cuda: logits need unit stride along the vocabulary, got strides ", logits.strides());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "sirl_kernels_cuda: labels must be [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "sirl_kernels_cuda: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), "sirl_kernels_cuda: labels on ", labels.device(),
              " but logits on ", logits.device());
}

// Per-row fp32 vectors, contiguous, on the logits' device.
at::Tensor row_vector(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "sirl_kernels_cuda: ", name, " must be [",
              logits.size(0), "], got ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), "sirl_kernels_cuda: ", name, " on ", t.device(), " but logits on ",
              logits.device());
  return t.to(at::kFloat).contiguous();
}

// Multiprocessor count of a device, queried once (the split-V plan needs it to size the workspace).
int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  const int idx = static_cast<int>(device);
  if (idx >= 0 && idx < static_cast<int>(cache.size())) {
    const int cached = cache[idx].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, idx));
  if (idx >= 0 && idx < static_cast<int>(cache.size())) cache[idx].store(sms, std::memory_order_relaxed);
  return sms;
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void check_status(const sirl_cuda::Status& st) {
  TORCH_CHECK(st.ok(), "sirl_kernels_cuda: ", sirl_cuda::code_name(st.code), ": ", st.message);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                               double temperature, int64_t ignore_index,
                                                               int64_t num_splits) {
  check_logits(logits, labels);
  TORCH_CHECK(num_splits >= 0 && num_splits <= sirl_cuda::kMaxSplits, "sirl_kernels_cuda: num_splits must be in [0, ",
              sirl_cuda::kMaxSplits, "], got ", num_splits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const int64_t v = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, opts);
  at::Tensor entropy = at::empty({n}, opts);
  at::Tensor lse = at::empty({n}, opts);

  sirl_cuda::ForwardParams p;
  p.logits = logits.data_ptr();
  p.dtype = dtype_code(logits);
  p.rows = n;
  p.vocab = v;
  p.row_stride = logits.stride(0);
  p.labels = labels.data_ptr<int64_t>();
  p.label_stride = labels.stride(0);
  p.temperature = temperature;
  p.ignore_index = ignore_index;
  p.logprobs = logprobs.data_ptr<float>();
  p.entropy = entropy.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.num_sms = multiprocessor_count(logits.get_device());
  p.num_splits = static_cast<int>(sirl_cuda::forward_num_splits(n, v, p.num_sms, static_cast<int>(num_splits)));
  at::Tensor workspace;
  const size_t ws_bytes = sirl_cuda::forward_workspace_bytes(n, p.num_splits);
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = ws_bytes;
  }
  check_status(sirl_cuda::logits_forward(p, current_stream(logits)));
  return {logprobs, entropy, lse};
}

void backward_into(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& logits,
                   const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                   int64_t ignore_index, const at::Tensor& out) {
  check_logits(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g_lp = row_vector(grad_logprobs, logits, "grad_logprobs");
  const at::Tensor g_h = row_vector(grad_entropy, logits, "grad_entropy");
  const at::Tensor lse32 = row_vector(lse, logits, "lse");
  const at::Tensor ent32 = row_vector(entropy, logits, "entropy");
  sirl_cuda::BackwardParams p;
  p.grad_logprobs = g_lp.data_ptr<float>();
  p.grad_entropy = g_h.data_ptr<float>();
  p.logits = logits.data_ptr();
  p.dtype = dtype_code(logits);
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.row_stride = logits.stride(0);
  p.labels = labels.data_ptr<int64_t>();
  p.label_stride = labels.stride(0);
  p.lse = lse32.data_ptr<float>();
  p.entropy = ent32.data_ptr<float>();
  p.temperature = temperature;
  p.ignore_index = ignore_index;
  p.grad_logits = out.data_ptr();
  p.grad_row_stride = out.stride(0);
  check_status(sirl_cuda::logits_backward(p, current_stream(logits)));
}

at::Tensor logits_backward(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& logits,
                           const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                           double temperature, int64_t ignore_index) {
  check_logits(logits, labels);
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, out);
  return out;
}

void logits_backward_inplace(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                             const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, logits);
}

}  // namespace

TORCH_LIBRARY(sirl_kernels_cuda, m) {
  m.def(
      "logits_forward(Tensor logits, Tensor labels, float temperature, int ignore_index, int num_splits=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "logits_backward(Tensor grad_logprobs, Tensor grad_entropy, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "logits_backward_inplace(Tensor grad_logprobs, Tensor grad_entropy, Tensor(a!) logits, Tensor labels, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(sirl_kernels_cuda, CUDA, m) {
  m.impl("logits_forward", &logits_forward);
  m.impl("logits_backward", &logits_backward);
  m.impl("logits_backward_inplace", &logits_backward_inplace);
}

// `import sirl_kernels._C_cuda` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", "sirl-kernels CUDA ops (torch.ops.sirl_kernels_cuda)",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
