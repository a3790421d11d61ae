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

#define SIRL_CPU_DECLARE_KERNELS                                                                                 \
  void forward_rows(const sirl_forward_args& args, float inv_t, int64_t r0, int64_t r1);                        \
  void backward_rows(const sirl_backward_args& args, float inv_t, int64_t r0, int64_t r1);                      \
  void exp_array(const float* x, float* y, int64_t n, int variant);                                              \
  void convert_array(int src_dtype, const void* src, int dst_dtype, void* dst, int64_t n);

namespace avx512 { SIRL_CPU_DECLARE_KERNELS }
namespace avx2 { SIRL_CPU_DECLARE_KERNELS }
namespace baseline { SIRL_CPU_DECLARE_KERNELS }

}  // namespace sirl_cpu
