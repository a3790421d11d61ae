// Private interface between the torch binding (sirl_cpu.cpp) and the per-ISA kernel builds (isa_*.cpp).
// Torch-free: the kernels take raw pointers, element strides and a row range [r0, r1).
#pragma once

#include <stdint.h>

namespace sirl_cpu {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

#define SIRL_CPU_DECLARE_KERNELS                                                                                 \
  void forward_rows(int dtype, const void* x, int64_t row_stride, int64_t v, const int64_t* labels, float inv_t,  \
                    int64_t ignore_index, float* lp, float* h, float* lse, int64_t r0, int64_t r1);              \
  void backward_rows(int dtype, const void* x, int64_t row_stride, int64_t v, const int64_t* labels,             \
                     const float* lse, const float* entropy, const float* g_lp, const float* g_h, float inv_t,   \
                     int64_t ignore_index, void* out, int64_t out_stride, float* out32, int64_t out32_stride,     \
                     int64_t r0, int64_t r1);                                                                    \
  void exp_array(const float* x, float* y, int64_t n, int variant);                                                                \
  void convert_array(int src_dtype, const void* src, int dst_dtype, void* dst, int64_t n);

namespace avx512 { SIRL_CPU_DECLARE_KERNELS }
namespace avx2 { SIRL_CPU_DECLARE_KERNELS }
namespace baseline { SIRL_CPU_DECLARE_KERNELS }

}  // namespace sirl_cpu
