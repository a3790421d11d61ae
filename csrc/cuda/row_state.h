// Small, torch-free helpers on top of sirl::OnlineState used by the CUDA kernels; __host__ __device__ so the
// host-only test checks them against sirl::update on the CPU.
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
// rescaling. -inf entries contribute nothing (their 0 * -inf term is skipped), an all -inf vector is the
// empty state, and NaN propagates into sumexp.
template <int kN>
SIRL_HD sirl::OnlineState vector_state(const float (&z)[kN]) {
  float m = z[0];
SIRL_CUDA_UNROLL
  for (int i = 1; i < kN; ++i) m = fmaxf(m, z[i]);
  if (m == -INFINITY) return sirl::empty_state();
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

// Outputs of one row from its full state (thread 0 of the block, or the split-V merge). A label outside
// [0, vocab) that is not ignore_index (the Python API rejects it first) yields NaN rather than a wild read.
struct RowOutputs {
  float logprob;
  float entropy;
  float lse;
};

SIRL_HD RowOutputs ignored_row() { return RowOutputs{0.0f, 0.0f, 0.0f}; }

SIRL_HD RowOutputs bad_label_row() { return RowOutputs{NAN, NAN, NAN}; }

SIRL_HD RowOutputs finish_row(sirl::OnlineState s, float z_label) {
  const sirl::RowResult r = sirl::finalize(s, z_label);
  return RowOutputs{r.logprob, r.entropy, r.lse};
}

}  // namespace sirl_cuda
