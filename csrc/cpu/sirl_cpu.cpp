// Torch binding of the fused CPU kernels: the sirl_kernels_cpu operator library, run-time ISA dispatch, and
// parallelism over rows (at::parallel_for, so torch.set_num_threads applies).
//
// Ops (all CPU):
//   forward(logits, labels, temperature, ignore_index) -> (logprobs, entropy, lse)
//   backward(grad_lp, grad_h, logits, labels, lse, entropy, temperature, ignore_index) -> grad_logits
//   backward_out(..., out, out_f32?)  writes the gradient into `out` (which may be `logits` itself: in place),
//                                     and optionally an fp32 copy into `out_f32`
//   isa() -> str, set_isa(name) -> str   which kernel build runs ("avx512", "avx2", "baseline")
//   empty_hugepage(size, dtype)          an uninitialised CPU tensor backed by transparent huge pages if large
//   _exp(x, variant), _convert(x, dtype) test hooks: the vector exps (0: any x, 1: x <= 0, 2: the forward's
//                                        base-2 exp of x <= 0) and the conversions
//
// Every row is reduced by one thread in a fixed order, so results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <sys/mman.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "kernels.h"

namespace sirl_cpu {
namespace {

struct Kernels {
  const char* name;
  decltype(&baseline::forward_rows) forward_rows;
  decltype(&baseline::backward_rows) backward_rows;
  decltype(&baseline::exp_array) exp_array;
  decltype(&baseline::convert_array) convert_array;
};

const Kernels kAvx512{"avx512", avx512::forward_rows, avx512::backward_rows, avx512::exp_array,
                      avx512::convert_array};
const Kernels kAvx2{"avx2", avx2::forward_rows, avx2::backward_rows, avx2::exp_array, avx2::convert_array};
const Kernels kBaseline{"baseline", baseline::forward_rows, baseline::backward_rows, baseline::exp_array,
                        baseline::convert_array};

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}

// The best build this CPU runs, capped by `request` ("avx512" | "avx2" | "baseline" | "" for no cap).
const Kernels* pick(const std::string& request) {
  TORCH_CHECK_VALUE(request.empty() || request == "avx512" || request == "avx2" || request == "baseline",
                    "unknown CPU ISA '", request, "'; expected 'avx512', 'avx2' or 'baseline'");
  if (request == "baseline") return &kBaseline;
  if (request != "avx2" && cpu_has_avx512()) return &kAvx512;
  if (cpu_has_avx2()) return &kAvx2;
  return &kBaseline;
}

std::atomic<const Kernels*>& active() {
  static std::atomic<const Kernels*> k{[] {
    const char* env = std::getenv("SIRL_KERNELS_CPU_ISA");
    return pick(env ? std::string(env) : std::string());
  }()};
  return k;
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK_TYPE(false, "sirl_kernels_cpu: logits must be float32, bfloat16 or float16, got ", t);
  }
  return -1;
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "sirl_kernels_cpu: logits must be a CPU tensor, got ",
                    logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, "sirl_kernels_cpu: logits must be 2-D [N, V], got ", logits.dim(), "-D");
  TORCH_CHECK_VALUE(logits.size(1) <= 1 || logits.stride(1) == 1,
                    "sirl_kernels_cpu: logits must have unit stride along V, got stride ", logits.stride(1));
  TORCH_CHECK_VALUE(logits.stride(0) >= 0, "sirl_kernels_cpu: negative row stride");
  dtype_code(logits.scalar_type());
}

at::Tensor check_rows(const at::Tensor& t, int64_t n, const char* what, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sirl_kernels_cpu: ", what, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "sirl_kernels_cpu: ", what, " must have shape [", n, "], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "sirl_kernels_cpu: ", what, " must be ", dtype, ", got ",
                   t.scalar_type());
  return t.contiguous();
}

// A fresh tensor whose pages the kernel will touch for the first time. Large ones ask the kernel for transparent
// huge pages (where THP is in "madvise" mode): first-touch page faults of a multi-GB gradient otherwise cost
// more than the kernel itself. Only affects memory mapping, never values; a failed madvise is ignored.
at::Tensor empty_large(at::IntArrayRef sizes, at::TensorOptions options) {
  at::Tensor t = at::empty(sizes, options);
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = (b + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
  return t;
}

at::Tensor empty_hugepage(at::IntArrayRef sizes, at::ScalarType dtype) {
  return empty_large(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// The kernels index rows by label: refuse out-of-range labels here too (the Python API checks first, with a
// friendlier message), so calling the op directly can never read out of bounds.
void check_label_range(const at::Tensor& labels, int64_t v, int64_t ignore_index) {
  const int64_t* p = labels.data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] == ignore_index || (p[i] >= 0 && p[i] < v), "sirl_kernels_cpu: label ", p[i],
                      " at position ", i, " is outside [0, ", v, ") and is not ignore_index (", ignore_index, ")");
  }
}

// Rows per task: enough elements per task that scheduling is negligible.
int64_t grain(int64_t v) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(v, 1)); }

float inv_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "sirl_kernels_cpu: temperature must be finite and > 0, got ", temperature);
  // Same rounding as torch_ref: 1/T in double, then the fp32 multiply converts it to float.
  return static_cast<float>(1.0 / temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& labels_in,
                                                       double temperature, int64_t ignore_index) {
  check_logits(logits);
  const int64_t n = logits.size(0), v = logits.size(1);
  const at::Tensor labels = check_rows(labels_in, n, "labels", at::kLong);
  check_label_range(labels, v, ignore_index);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({n}, opts), h = at::empty({n}, opts), lse = at::empty({n}, opts);
  if (n == 0) return {lp, h, lse};
  TORCH_CHECK_VALUE(v > 0, "sirl_kernels_cpu: empty vocabulary");
  const float inv_t = inv_temperature(temperature);
  const int code = dtype_code(logits.scalar_type());
  const Kernels* k = active().load();
  const void* x = logits.data_ptr();
  const int64_t rs = logits.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  float *plp = lp.data_ptr<float>(), *ph = h.data_ptr<float>(), *plse = lse.data_ptr<float>();
  at::parallel_for(0, n, grain(v), [&](int64_t r0, int64_t r1) {
    k->forward_rows(code, x, rs, v, lab, inv_t, ignore_index, plp, ph, plse, r0, r1);
  });
  return {lp, h, lse};
}

void backward_out(const at::Tensor& grad_lp_in, const at::Tensor& grad_h_in, const at::Tensor& logits,
                  const at::Tensor& labels_in, const at::Tensor& lse_in, const at::Tensor& entropy_in,
                  double temperature, int64_t ignore_index, const at::Tensor& out,
                  const std::optional<at::Tensor>& out_f32) {
  check_logits(logits);
  const int64_t n = logits.size(0), v = logits.size(1);
  const at::Tensor labels = check_rows(labels_in, n, "labels", at::kLong);
  check_label_range(labels, v, ignore_index);
  const at::Tensor g_lp = check_rows(grad_lp_in, n, "grad_logprobs", at::kFloat);
  const at::Tensor g_h = check_rows(grad_h_in, n, "grad_entropy", at::kFloat);
  const at::Tensor lse = check_rows(lse_in, n, "lse", at::kFloat);
  const at::Tensor ent = check_rows(entropy_in, n, "entropy", at::kFloat);
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.dim() == 2 && out.size(0) == n && out.size(1) == v,
                    "sirl_kernels_cpu: out must be a CPU tensor of shape [", n, ", ", v, "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == logits.scalar_type(), "sirl_kernels_cpu: out must have the logits' dtype ",
                   logits.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(v <= 1 || out.stride(1) == 1, "sirl_kernels_cpu: out must have unit stride along V");
  // In place is supported only as exact aliasing (each element is read before it is written, row by row).
  if (out.data_ptr() == logits.data_ptr()) {
    TORCH_CHECK_VALUE(out.stride(0) == logits.stride(0), "sirl_kernels_cpu: in-place out must alias logits exactly");
  }
  float* p32 = nullptr;
  int64_t s32 = 0;
  if (out_f32.has_value() && out_f32->defined()) {
    const at::Tensor& o = *out_f32;
    TORCH_CHECK_VALUE(o.device().is_cpu() && o.dim() == 2 && o.size(0) == n && o.size(1) == v &&
                          (v <= 1 || o.stride(1) == 1),
                      "sirl_kernels_cpu: out_f32 must be a CPU [", n, ", ", v, "] tensor with unit stride along V");
    TORCH_CHECK_TYPE(o.scalar_type() == at::kFloat, "sirl_kernels_cpu: out_f32 must be float32");
    p32 = o.data_ptr<float>();
    s32 = o.stride(0);
  }
  if (n == 0 || v == 0) return;
  const float inv_t = inv_temperature(temperature);
  const int code = dtype_code(logits.scalar_type());
  const Kernels* k = active().load();
  const void* x = logits.data_ptr();
  void* po = out.data_ptr();
  const int64_t rs = logits.stride(0), os = out.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float *plse = lse.data_ptr<float>(), *pent = ent.data_ptr<float>();
  const float *pgl = g_lp.data_ptr<float>(), *pgh = g_h.data_ptr<float>();
  at::parallel_for(0, n, grain(v), [&](int64_t r0, int64_t r1) {
    k->backward_rows(code, x, rs, v, lab, plse, pent, pgl, pgh, inv_t, ignore_index, po, os, p32, s32, r0, r1);
  });
}

at::Tensor backward(const at::Tensor& grad_lp, const at::Tensor& grad_h, const at::Tensor& logits,
                    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                    int64_t ignore_index) {
  check_logits(logits);
  at::Tensor out = empty_large(logits.sizes(), logits.options());
  backward_out(grad_lp, grad_h, logits, labels, lse, entropy, temperature, ignore_index, out, std::nullopt);
  return out;
}

std::string isa() { return active().load()->name; }

std::string set_isa(std::string name) {
  const Kernels* k = pick(name == "auto" ? std::string() : name);
  active().store(k);
  return k->name;
}

at::Tensor exp_hook(const at::Tensor& x_in, int64_t variant) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "_exp takes float32");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  active().load()->exp_array(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(),
                                 static_cast<int>(variant));
  return y;
}

at::Tensor convert_hook(const at::Tensor& x_in, at::ScalarType dtype) {
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(dtype));
  active().load()->convert_array(dtype_code(x.scalar_type()), x.data_ptr(), dtype_code(dtype), y.data_ptr(),
                                 x.numel());
  return y;
}

}  // namespace
}  // namespace sirl_cpu

TORCH_LIBRARY(sirl_kernels_cpu, m) {
  m.def("forward(Tensor logits, Tensor labels, float temperature, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_logprobs, Tensor grad_entropy, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "backward_out(Tensor grad_logprobs, Tensor grad_entropy, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index, Tensor(a!) out, Tensor(b!)? out_f32) -> ()");
  m.def("_exp(Tensor x, int variant=0) -> Tensor");
  m.def("_convert(Tensor x, ScalarType dtype) -> Tensor");
  // Not tensor ops: registered as plain functions (CompositeImplicit) so they need no dispatch key.
  m.def("isa", &sirl_cpu::isa);
  m.def("set_isa", &sirl_cpu::set_isa);
  m.def("empty_hugepage(int[] size, ScalarType dtype) -> Tensor", &sirl_cpu::empty_hugepage);
}

TORCH_LIBRARY_IMPL(sirl_kernels_cpu, CPU, m) {
  m.impl("forward", &sirl_cpu::forward);
  m.impl("backward", &sirl_cpu::backward);
  m.impl("backward_out", &sirl_cpu::backward_out);
  m.impl("_exp", &sirl_cpu::exp_hook);
  m.impl("_convert", &sirl_cpu::convert_hook);
}

// `import sirl_kernels._C_cpu` loads this shared library, which runs the registrations above; the module itself
// is empty (the ops live under torch.ops.sirl_kernels_cpu).
extern "C" {
PyObject* PyInit__C_cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
