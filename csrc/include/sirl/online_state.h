// The online-softmax state shared by every C++ and CUDA kernel of sirl-kernels.
//
// For a row z (logits already multiplied by 1/T) keep
//   max    = max_i z_i
//   sumexp = sum_i exp(z_i - max)
//   wsum   = sum_i exp(z_i - max) * (z_i - max)
// Two partial states merge exactly (a monoid), which is what lets a CPU loop, CUDA warps and split-V blocks
// reduce in any fixed order. Then lse = max + log(sumexp), entropy = log(sumexp) - wsum / sumexp.
//
// This header is torch-free and compiles as plain C++ or under nvcc (__host__ __device__), so the CPU tests
// exercise exactly the arithmetic the GPU runs.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SIRL_HD __host__ __device__ __forceinline__
#else
#define SIRL_HD inline
#endif

namespace sirl {

struct OnlineState {
  float max;
  float sumexp;
  float wsum;
};

struct RowResult {
  float logprob;
  float entropy;
  float lse;
};

SIRL_HD OnlineState empty_state() { return OnlineState{-INFINITY, 0.0f, 0.0f}; }

// A single finite-or-(-inf) logit as a state. -inf contributes nothing: exp(-inf) = 0 and its (z - max) term
// must not turn 0 * -inf into NaN.
SIRL_HD OnlineState singleton_state(float z) {
  if (z == -INFINITY) return empty_state();
  return OnlineState{z, 1.0f, 0.0f};
}

// Exact merge. The state with the smaller max is rescaled to the larger one:
//   d = max_small - max_big <= 0,  wsum <- exp(d) (wsum + d sumexp),  sumexp <- exp(d) sumexp.
SIRL_HD OnlineState merge(OnlineState a, OnlineState b) {
  if (a.max < b.max) {
    OnlineState t = a;
    a = b;
    b = t;
  }
  if (b.max == -INFINITY) return a;  // b is empty (or both are)
  const float d = b.max - a.max;
  const float scale = expf(d);
  OnlineState r;
  r.max = a.max;
  r.sumexp = a.sumexp + scale * b.sumexp;
  r.wsum = a.wsum + scale * (b.wsum + d * b.sumexp);
  return r;
}

// Adds one logit to a state (the slow, scalar path used for tails and tests).
SIRL_HD OnlineState update(OnlineState s, float z) { return merge(s, singleton_state(z)); }

SIRL_HD float state_lse(OnlineState s) { return s.max + logf(s.sumexp); }

// Entropy is non-negative; rounding can leave it a few ulp below zero, which we clamp.
SIRL_HD float state_entropy(OnlineState s) {
  const float h = logf(s.sumexp) - s.wsum / s.sumexp;
  return h > 0.0f ? h : (h == h ? 0.0f : h);  // keep NaN (all -inf row) visible
}

// z_label is the label's scaled logit (z = x / T).
SIRL_HD RowResult finalize(OnlineState s, float z_label) {
  RowResult r;
  r.lse = state_lse(s);
  r.entropy = state_entropy(s);
  r.logprob = z_label - r.lse;
  return r;
}

// d/dz_i of (g_lp * logprob + g_h * entropy) for a non-label element, times 1/T (chain rule through z = x/T):
//   [-g_lp p_i - g_h p_i (z_i - lse + H)] / T.
// p_i = 0 (z_i = -inf) gives exactly 0 instead of 0 * -inf.
SIRL_HD float grad_nonlabel(float z, float lse, float entropy, float g_lp, float g_h, float inv_t) {
  const float logp = z - lse;
  const float p = expf(logp);
  if (p == 0.0f) return 0.0f;
  return -p * (g_lp + g_h * (logp + entropy)) * inv_t;
}

// The label element: g_lp (1 - p_y) with 1 - p_y = -expm1(log p_y), exact in fp32 even when p_y -> 1.
SIRL_HD float grad_label(float z, float lse, float entropy, float g_lp, float g_h, float inv_t) {
  const float logp = z - lse;
  const float p = expf(logp);
  const float one_minus_p = -expm1f(logp);
  const float ent_term = (p == 0.0f) ? 0.0f : g_h * p * (logp + entropy);
  return (g_lp * one_minus_p - ent_term) * inv_t;
}

}  // namespace sirl
