// The CUDA kernels' vector form of sirl::OnlineState; __host__ __device__ so the host-only test checks it against
// sirl::update (the header's scalar definition) on the CPU, adversarial values included.
#pragma once

#include "sirl/online_state.h"

// `#pragma unroll` only where nvcc compiles device code (g++ -Wall would flag the unknown pragma).
#if defined(__CUDA_ARCH__)
#define SIRL_CUDA_UNROLL _Pragma("unroll")
#else
#define SIRL_CUDA_UNROLL
#endif

namespace sirl_cuda {

// The state of kN logits at once: one shared max, then sumexp and wsum relative to it. Equal (up to fp32
// rounding) to folding sirl::update over the kN values, with one expf per element and no data-dependent
// rescaling. Special values as the header defines them:
//   -inf entries contribute nothing (their 0 * -inf term is skipped); all -inf is the empty state;
//   +inf makes z - max = inf - inf = NaN, so NaN sums;
//   NaN: fmaxf skips it, so a finite max leaves exp(NaN - max) = NaN in the sums, and a vector holding only NaN
//   and -inf (max -inf) is the NaN state, never the empty one a later merge would drop.
template <int kN>
SIRL_HD sirl::OnlineState vector_state(const float (&z)[kN]) {
  float m = z[0];
SIRL_CUDA_UNROLL
  for (int i = 1; i < kN; ++i) m = fmaxf(m, z[i]);
  if (m == -INFINITY || m != m) {
    bool nan = false;
SIRL_CUDA_UNROLL
    for (int i = 0; i < kN; ++i) nan |= z[i] != z[i];
    return nan ? sirl::nan_state() : sirl::empty_state();
  }
  float s = 0.0f;
  float w = 0.0f;
SIRL_CUDA_UNROLL
  for (int i = 0; i < kN; ++i) {
    const float d = z[i] - m;
    const float e = expf(d);
    s += e;
    w += (e > 0.0f) ? e * d : 0.0f;
  }
  return sirl::OnlineState{m, s, w};
}

}  // namespace sirl_cuda
