// The row kernels compiled for AVX-512 (x86-64-v4 class CPUs). Chosen at run time by library.cpp.
// Shared headers come first, outside the target region, so their inline functions are never emitted with
// instructions the running CPU may lack.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include <immintrin.h>  // fixed_order_logits.inc: explicit FMA intrinsics

#include "kernels.h"
#include "sirl/host_api.h"
#include "sirl/online_state.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")

#define SIRL_VEC_BYTES 64
namespace sirl_cpu {
namespace avx512 {
#include "row_kernels.inc"
#include "fixed_order_logits.inc"
}  // namespace avx512
}  // namespace sirl_cpu

#undef SIRL_VEC_BYTES
#pragma GCC pop_options
