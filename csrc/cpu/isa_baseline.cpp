// The row kernels compiled for the baseline ISA of the build. Chosen at run time by library.cpp.
// Shared headers come first, outside the target region, so their inline functions are never emitted with
// instructions the running CPU may lack.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "kernels.h"
#include "sirl/host_api.h"
#include "sirl/online_state.h"

#pragma GCC push_options
// No target pragma: the flags of the build (baseline x86-64, SSE2), so it runs on any x86-64 CPU.

#define SIRL_VEC_BYTES 16
namespace sirl_cpu {
namespace baseline {
#include "row_kernels.inc"
#include "fixed_order_logits.inc"
}  // namespace baseline
}  // namespace sirl_cpu

#undef SIRL_VEC_BYTES
#pragma GCC pop_options
