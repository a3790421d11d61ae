// The row kernels compiled for AVX2 + FMA (x86-64-v3 class CPUs). Chosen at run time by library.cpp.
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
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")

#define SIRL_VEC_BYTES 32
namespace sirl_cpu {
namespace avx2 {
#include "row_kernels.inc"
#include "fixed_order_logits.inc"
}  // namespace avx2
}  // namespace sirl_cpu

#undef SIRL_VEC_BYTES
#pragma GCC pop_options
