// The online-softmax state shared by every C++ and CUDA kernel of sirl-kernels: the one place the math lives in
// C++. The CPU SIMD loop (csrc/cpu/row_kernels.inc), the CUDA vector form (csrc/cuda/row_state.h) and the Triton
// kernels are re-derivations of it for their hardware; tests run each of them against this header on the same
// adversarial rows (csrc/tests, csrc/cuda/test_cuda_launchers.cpp, tests/sirl_kernels/test_state_vs_header.py,
// which calls the scalar reference built from this header into libsirl_cpu).
//
// For a row z (logits already multiplied by 1/T) keep
//   max    = max_i z_i
//   sumexp = sum_i exp(z_i - max)
//   wsum   = sum_i exp(z_i - max) * (z_i - max)
// Two partial states merge exactly (a monoid), which is what lets a CPU loop, CUDA warps and split-V blocks
// reduce in any fixed order. A row's result keeps (max, log sumexp) apart: log p_i = (z_i - max) - log sumexp is
// exact near the top of the row, where z_i - lse would lose ulp(lse) (0.06 at logits near 1e6).
//
// Special values, as torch.log_softmax treats them:
//   -inf  contributes nothing (exp(-inf) = 0, and its (z - max) term must not turn 0 * -inf into NaN);
//   NaN   poisons the row: the state of a NaN has a NaN max, which wins every merge, and NaN sums, so logprob,
//         entropy and both stats come out NaN wherever the NaN sits;
//   +inf  poisons the row too (exp(z - max) = exp(inf - inf) is NaN): NaN sums, so NaN logprob and entropy;
//   all -inf: the empty state, whose logprob and entropy are NaN.
// Invariant every producer of states keeps: a state whose max is -inf is the empty state (sums exactly 0).
//
// This header is torch-free and compiles as plain C++ or under nvcc (__host__ __device__), so the CPU tests
// exercise exactly the arithmetic the GPU runs.
#pragma once

#include <math.h>
#include <stdint.h>

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

// What a forward writes per row: the two outputs and the row stats (max, log sumexp) its backward reads back.
struct RowResult {
  float logprob;
  float entropy;
  float max;
  float log_sum;
};

SIRL_HD OnlineState empty_state() { return OnlineState{-INFINITY, 0.0f, 0.0f}; }

SIRL_HD OnlineState nan_state() { return OnlineState{NAN, NAN, NAN}; }

// One logit as a state: {z, exp(z - z), 0}. -inf is the empty state; NaN and +inf, for which z - z is NaN, give
// NaN sums (and NaN keeps its NaN max, so it survives every merge).
SIRL_HD OnlineState singleton_state(float z) {
  if (z == -INFINITY) return empty_state();
  if (z != z || z == INFINITY) return OnlineState{z, NAN, NAN};
  return OnlineState{z, 1.0f, 0.0f};
}

// Exact merge. The state with the smaller max is rescaled to the larger one:
//   d = max_small - max_big <= 0,  wsum <- exp(d) (wsum + d sumexp),  sumexp <- exp(d) sumexp.
// A NaN max takes the larger one's place, so a NaN is never dropped as "the empty side"; every other NaN travels
// through the arithmetic (NaN sums, or d = inf - inf).
//
// merge_scaled is the same for states whose max is kept in the raw logits x (z = x * inv_t), as the CPU kernels
// keep it: d = (max_small - max_big) * inv_t, the difference taken before the scaling (exact by Sterbenz's lemma
// for maxes within a factor 2, e.g. under a common offset of 1e6) so that no max / T rounding enters the weights.
// With inv_t = 1 the two are the same function.
SIRL_HD OnlineState merge_scaled(OnlineState a, OnlineState b, float inv_t) {
  if (a.max < b.max || b.max != b.max) {
    const OnlineState t = a;
    a = b;
    b = t;
  }
  if (b.max == -INFINITY) return a;  // b is empty (or both are)
  const float d = (b.max - a.max) * inv_t;
  const float scale = expf(d);
  if (scale == 0.0f) {
    // b's terms underflow to nothing (d may even be -inf, for maxes of opposite huge signs, where d * sumexp would
    // make 0 * inf): they add exactly 0, yet a NaN in b's sums still comes through (0 * NaN is NaN).
    return OnlineState{a.max, a.sumexp + 0.0f * b.sumexp, a.wsum + 0.0f * b.wsum};
  }
  OnlineState r;
  r.max = a.max;
  r.sumexp = a.sumexp + scale * b.sumexp;
  r.wsum = a.wsum + scale * (b.wsum + d * b.sumexp);
  return r;
}

SIRL_HD OnlineState merge(OnlineState a, OnlineState b) { return merge_scaled(a, b, 1.0f); }

// Adds one logit to a state (the slow, scalar path used for tails, the reference and tests).
SIRL_HD OnlineState update(OnlineState s, float z) { return merge(s, singleton_state(z)); }

// Entropy is non-negative; rounding can leave it a few ulp below zero, which we clamp.
SIRL_HD float state_entropy(OnlineState s) {
  const float h = logf(s.sumexp) - s.wsum / s.sumexp;
  return h > 0.0f ? h : (h == h ? 0.0f : h);  // keep NaN (all -inf row) visible
}

// log p_i from a row's stats: (z_i - max) - log_sum, the two subtractions in this order (never z_i - lse).
SIRL_HD float log_prob(float z, float max, float log_sum) { return (z - max) - log_sum; }

// A row's entropy and stats (max, log sumexp) from its full state; the caller sets logprob with its own form of
// log p_label (finalize: log_prob in z units; the CPU kernels: the same in raw units, see row_kernels.inc).
SIRL_HD RowResult finalize_stats(OnlineState s) {
  RowResult r;
  r.log_sum = logf(s.sumexp);
  // NaN sums (a NaN or +inf logit; a SIMD or vector max may have skipped the NaN itself) make both stats NaN.
  r.max = r.log_sum == r.log_sum ? s.max : NAN;
  r.entropy = state_entropy(s);
  r.logprob = NAN;
  return r;
}

// z_label is the label's scaled logit (z = x / T).
SIRL_HD RowResult finalize(OnlineState s, float z_label) {
  RowResult r = finalize_stats(s);
  r.logprob = log_prob(z_label, r.max, r.log_sum);
  return r;
}

// What a row's label makes of it: its column (>= 0), or kIgnoredRow (label == ignore_index: zero outputs and
// gradient) or kBadLabelRow (a label outside [0, vocab): NaN outputs and gradient, and the row is never indexed by
// it). One classification for the host kernels and both CUDA kernels.
constexpr int64_t kIgnoredRow = -1;
constexpr int64_t kBadLabelRow = -2;
SIRL_HD int64_t label_column(int64_t label, int64_t vocab, int64_t ignore_index) {
  if (label == ignore_index) return kIgnoredRow;
  return (label >= 0 && label < vocab) ? label : kBadLabelRow;
}

// Rows whose label is ignore_index: zeros (the stats are never read back). Rows whose label is outside [0, V)
// (unchecked by the caller): NaN everywhere, never a read outside the row.
SIRL_HD RowResult ignored_row() { return RowResult{0.0f, 0.0f, 0.0f, 0.0f}; }
SIRL_HD RowResult bad_label_row() { return RowResult{NAN, NAN, NAN, NAN}; }

// d/dz_i of (g_lp * logprob + g_h * entropy) for a non-label element, times 1/T (chain rule through z = x/T):
//   [-g_lp p_i - g_h p_i (log p_i + H)] / T.
// p_i = 0 (z_i = -inf) gives exactly 0 instead of 0 * -inf; a NaN log p_i (a NaN row) gives NaN.
SIRL_HD float grad_nonlabel(float logp, float entropy, float g_lp, float g_h, float inv_t) {
  const float p = expf(logp);
  if (p == 0.0f) return 0.0f;
  return -p * (g_lp + g_h * (logp + entropy)) * inv_t;
}

// The label element: g_lp (1 - p_y) with 1 - p_y = -expm1(log p_y), exact in fp32 even when p_y -> 1.
SIRL_HD float grad_label(float logp, float entropy, float g_lp, float g_h, float inv_t) {
  const float p = expf(logp);
  const float one_minus_p = -expm1f(logp);
  const float ent_term = (p == 0.0f) ? 0.0f : g_h * p * (logp + entropy);
  return (g_lp * one_minus_p - ent_term) * inv_t;
}

}  // namespace sirl
