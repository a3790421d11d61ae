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

// The backward form (sirl_kernels/backends/rows.py): per row coefficients alpha, beta, lam select what is
// differentiated (g_lp * logprob + g_h * entropy is alpha = -g_lp - g_h H, beta = -g_h, lam = g_lp), and
//   dx_i = (p_i (alpha + beta log p_i) + lam [i = y]) / T      (the chain rule's 1/T through z = x/T).
// A non-label element: p_i = 0 (z_i = -inf) gives exactly 0 instead of 0 * -inf; a NaN log p_i (a NaN row) gives NaN.
SIRL_HD float grad_nonlabel(float logp, float alpha, float beta, float inv_t) {
  const float p = expf(logp);
  if (p == 0.0f) return 0.0f;
  return p * (alpha + beta * logp) * inv_t;
}

// The label element: p_y (alpha + lam + beta log p_y) - lam expm1(log p_y), i.e. lam (1 - p_y) with 1 - p_y formed
// as -expm1(log p_y), exact in fp32 even when p_y -> 1 (p_y alpha + lam would lose it to cancellation). The p term
// is 0 where p_y is, as for any other element.
SIRL_HD float grad_label(float logp, float alpha, float beta, float lam, float inv_t) {
  const float p = expf(logp);
  const float p_term = (p == 0.0f) ? 0.0f : p * (alpha + lam + beta * logp);
  return (p_term - lam * expm1f(logp)) * inv_t;
}

// ---------------------------------------------------------------------------------------------------------------
// Self-certainty and varentropy: optional accumulators beside a state (kept only by the kernels' specialised
// instantiations that are asked for them; the plain state above is untouched by them).
// ---------------------------------------------------------------------------------------------------------------
// With d_i = z_i - max (the same shift as the sums above), a state over n columns also keeps
//   dsum = sum_i d_i                  (self-certainty: mean(z) = max + dsum / n)
//   qsum = sum_i exp(d_i) d_i^2       (varentropy: E_p[d^2] = qsum / sumexp)
// Rescaled to a max higher by -c (c = old max - new max <= 0, in z units), d_i -> d_i + c, so
//   dsum <- dsum + n c,    qsum <- exp(c) (qsum + 2 c wsum + c^2 sumexp)     (wsum, sumexp: the same state's, old)
// and a row finalizes to
//   self_certainty = log sumexp - dsum / n - log n  (= lse(z) - mean(z) - log V = KL(U || p))
//   varentropy     = qsum / sumexp - (wsum / sumexp)^2, clamped at 0   (= Var_p[log p], shift-invariant)
// A -inf logit adds nothing to the sums but -inf to dsum (self-certainty +inf: KL(U || p) is infinite where p has a
// zero); its exp(d) d^2 term is 0 (never 0 * inf). NaN and +inf make NaN sums as above, so NaN results; an all -inf
// row has sumexp = 0 and dsum = -inf, so NaN results (log 0 - (-inf) and 0 / 0).
struct ExtraSums {
  float count;  // n, the columns the state covers (exact in fp32 up to 2^24)
  float dsum;
  float qsum;
};

struct ExtState {
  OnlineState s;
  ExtraSums x;
};

struct ExtraResult {
  float self_certainty;
  float varentropy;
};

SIRL_HD ExtState ext_empty_state() { return ExtState{empty_state(), ExtraSums{0.0f, 0.0f, 0.0f}}; }

SIRL_HD ExtState ext_nan_state(float count) { return ExtState{nan_state(), ExtraSums{count, NAN, NAN}}; }

// One logit: d = z - z = 0 (NaN for NaN and +inf), and -inf's d is -inf (its qsum term 0).
SIRL_HD ExtState ext_singleton_state(float z) {
  const OnlineState s = singleton_state(z);
  if (z == -INFINITY) return ExtState{s, ExtraSums{1.0f, -INFINITY, 0.0f}};
  const float d = z - z;
  return ExtState{s, ExtraSums{1.0f, d, d}};
}

// b's extras moved to a max higher by -c (c <= 0, z units; scale = exp(c)), with b's own (old) sumexp and wsum.
// scale == 0 (b's terms underflow, c may be -inf): qsum adds exactly 0 (a NaN still comes through); dsum takes
// n c all the same (-inf where c is: those logits are -inf relative to the new max). count == 0 (b empty of
// columns) adds nothing, never 0 * -inf.
SIRL_HD ExtraSums rescale_extras(ExtraSums x, OnlineState b, float c, float scale) {
  ExtraSums r;
  r.count = x.count;
  r.dsum = x.count == 0.0f ? x.dsum : x.dsum + x.count * c;
  r.qsum = scale == 0.0f ? 0.0f * x.qsum : scale * (x.qsum + c * (2.0f * b.wsum + c * b.sumexp));
  return r;
}

// merge_scaled for states with extras: the plain merge of the sums (the same function, so the same rounding), the
// extras of the smaller-max side rescaled by rescale_extras. The swap is merge_scaled's: NaN or larger max first.
SIRL_HD ExtState merge_scaled(ExtState a, ExtState b, float inv_t) {
  ExtState r;
  r.s = merge_scaled(a.s, b.s, inv_t);
  if (a.s.max < b.s.max || b.s.max != b.s.max) {
    const ExtState t = a;
    a = b;
    b = t;
  }
  ExtraSums xb = b.x;
  if (b.s.max != -INFINITY) {  // an empty b (no columns, or -inf ones only) has nothing to rescale: qsum = 0
    const float c = (b.s.max - a.s.max) * inv_t;
    xb = rescale_extras(b.x, b.s, c, expf(c));
  }
  r.x = ExtraSums{a.x.count + xb.count, a.x.dsum + xb.dsum, a.x.qsum + xb.qsum};
  return r;
}

SIRL_HD ExtState merge(ExtState a, ExtState b) { return merge_scaled(a, b, 1.0f); }

SIRL_HD ExtState update(ExtState s, float z) { return merge(s, ext_singleton_state(z)); }

SIRL_HD ExtraResult finalize_extras(OnlineState s, ExtraSums x) {
  ExtraResult r;
  r.self_certainty = logf(s.sumexp) - x.dsum / x.count - logf(x.count);
  const float mean = s.wsum / s.sumexp;
  const float ve = x.qsum / s.sumexp - mean * mean;
  r.varentropy = ve > 0.0f ? ve : (ve == ve ? 0.0f : ve);  // keep NaN
  return r;
}

// Ignored rows 0, bad-label rows NaN (as ignored_row / bad_label_row).
SIRL_HD ExtraResult ignored_extras() { return ExtraResult{0.0f, 0.0f}; }
SIRL_HD ExtraResult bad_label_extras() { return ExtraResult{NAN, NAN}; }

// The backward form with its optional terms (rows.py): gamma (varentropy) and delta (self-certainty),
//   non-label: (p (alpha + beta L + gamma L^2) + delta) / T,  p = 0: exactly delta / T;
//   label:     (p_y (alpha + lam + beta L + gamma L^2) - lam expm1(L) + delta) / T.
SIRL_HD float grad_nonlabel(float logp, float alpha, float beta, float gamma, float delta, float inv_t) {
  const float p = expf(logp);
  if (p == 0.0f) return delta * inv_t;
  return (p * (alpha + logp * (beta + gamma * logp)) + delta) * inv_t;
}

SIRL_HD float grad_label(float logp, float alpha, float beta, float lam, float gamma, float delta, float inv_t) {
  const float p = expf(logp);
  const float p_term = (p == 0.0f) ? 0.0f : p * (alpha + lam + logp * (beta + gamma * logp));
  return (p_term - lam * expm1f(logp) + delta) * inv_t;
}

}  // namespace sirl
