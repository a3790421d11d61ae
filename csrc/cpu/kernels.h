// Private interface between the C ABI of libsirl_cpu (library.cpp, reference.cpp) and the per-ISA kernel builds
// (isa_*.cpp). The kernels take the checked arguments of c_api.h and a row range [r0, r1): library.cpp splits
// the rows over threads, every row is reduced by one thread.
#pragma once

#include <stdint.h>

#include "sirl/c_api.h"

namespace sirl_cpu {

constexpr int kF32 = SIRL_FLOAT32;
constexpr int kBF16 = SIRL_BFLOAT16;
constexpr int kF16 = SIRL_FLOAT16;

// sirl_cpu_fixed_order_logits' checked arguments (c_api.h): out[n, v] = sum_d hidden[n, d] weight[v, d] in fp32.
struct FixedOrderArgs {
  const void* hidden;
  const void* weight;
  float* out;
  int64_t rows, dim, vocab, stride_hidden, stride_weight, stride_out;
  int32_t dtype;
};

#define SIRL_CPU_DECLARE_KERNELS                                                                                 \
  void forward_rows(const sirl_forward_args& args, float inv_t, int64_t r0, int64_t r1);                        \
  void backward_rows(const sirl_backward_args& args, float inv_t, int64_t r0, int64_t r1);                      \
  void exp_array(const float* x, float* y, int64_t n, int variant);                                              \
  void convert_array(int src_dtype, const void* src, int dst_dtype, void* dst, int64_t n);                      \
  int64_t fixed_order_panel_cols(int64_t dim);                                                                  \
  int64_t fixed_order_work_floats(int64_t dim);                                                                 \
  void fixed_order_logits(const FixedOrderArgs& args, int64_t v0, int64_t v1, int64_t r0, int64_t r1, float* work);

namespace avx512 { SIRL_CPU_DECLARE_KERNELS }
namespace avx2 { SIRL_CPU_DECLARE_KERNELS }
namespace baseline { SIRL_CPU_DECLARE_KERNELS }

}  // namespace sirl_cpu
