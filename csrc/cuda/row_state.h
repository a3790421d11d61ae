// The CUDA kernels' streaming forms of sirl::OnlineState and of its gradients; __host__ __device__ so the host-only
// test checks them against the header (sirl::update, sirl::grad_nonlabel) on the CPU, adversarial values included.
//
// They are laid out for the instruction count of the kernels' main loops (docs/cuda.md, "Main loops"; counted from
// the SASS by tools/cuda_sass.py): an H100 issues about 10 thread-instructions per byte of HBM bandwidth, 20 per
// bf16 logit read, so a loop that spends 24 (the previous vector form: a merge with expf per 8 logits) or 65 (the
// previous backward: expf, expm1f and a label branch per logit) per logit cannot reach the bandwidth.
#pragma once

#include "sirl/online_state.h"

// `#pragma unroll` only where nvcc compiles device code (g++ -Wall would flag the unknown pragma).
#if defined(__CUDA_ARCH__)
#define SIRL_CUDA_UNROLL _Pragma("unroll")
#else
#define SIRL_CUDA_UNROLL
#endif

namespace sirl_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegMax = -3.402823466e38f;  // -FLT_MAX: finite, so 0 * kNegMax is 0, not NaN
// exp2(t) is 0 in fp32 (flushed) for t <= kExp2Zero: the backward clamps there so that p = 0 gives exactly 0.
constexpr float kExp2Zero = -200.0f;

// 2^t: one MUFU.EX2 on the GPU (ex2.approx, relative error ~2^-22, denormal results flushed to 0), exp2f on the
// host (the host test's reference tolerance covers the difference).
SIRL_HD float fast_exp2(float t) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
#else
  return exp2f(t);
#endif
}

// A thread's running state over raw logits x (z = x * inv_t): max = max x, sum = sum 2^((x - max) k),
// wsum = sum 2^((x - max) k) (x - max), with k = inv_t * log2(e). The differences x - max are taken before any
// scaling (exact under a common offset), and each logit costs a max, a subtract, a multiply, an exp2, an add and,
// for wsum, a clamp and an FMA: x - max is clamped at -FLT_MAX so a -inf logit adds 0 (not 0 * -inf), while a NaN
// one still adds NaN through its exp2. NaN in any form ends as NaN sums (fmaxf drops NaN from the max).
struct RawState {
  float max;
  float sum;
  float wsum;
};

SIRL_HD RawState raw_empty() { return RawState{-INFINITY, 0.0f, 0.0f}; }

// Adds kN raw logits: one rescale of the running sums to the group's new max, then kN exponentials.
template <int kN>
SIRL_HD RawState raw_update(RawState st, const float (&x)[kN], float k) {
  float m = st.max;
SIRL_CUDA_UNROLL
  for (int i = 0; i < kN; ++i) m = fmaxf(m, x[i]);
  // rescale: equal maxima (both -inf too) by exactly 1; (a delta) taken as 0 where a underflows to 0, since
  // delta * sum alone overflows for maxima ~1e38 apart and is -inf * 0 for the empty state
  const float delta = (st.max == m) ? 0.0f : st.max - m;
  const float a = fast_exp2(delta * k);
  const float ad = (a == 0.0f) ? 0.0f : a * delta;
  float s = a * st.sum;
  float w = fmaf(ad, st.sum, a * st.wsum);
  const float m_safe = (m == -INFINITY) ? 0.0f : m;
SIRL_CUDA_UNROLL
  for (int i = 0; i < kN; ++i) {
    const float d = x[i] - m_safe;
    const float e = fast_exp2(d * k);
    s += e;
    w = fmaf(e, fmaxf(d, kNegMax), w);
  }
  return RawState{m, s, w};
}

// RawState with the self-certainty and varentropy sums (online_state.h: ExtraSums), for the forward's specialised
// instantiation only. With t = (x - max) k (log2 units): dsum = sum t (a -inf logit makes it -inf), qsum = sum e t^2
// (t clamped at -FLT_MAX as a product e t first, so e = 0 gives 0 * t = 0, never 0 * inf), count = logits seen. The
// rescale to a new max is the header's rescale_extras in log2 units, c = (old max - new max) k:
// dsum += count c (skipped for count = 0: never 0 * -inf), qsum <- a (qsum + c (2 k wsum + c sum)) (0 where a is).
struct RawExtState {
  RawState base;
  float count;
  float dsum;
  float qsum;
};

constexpr float kLn2 = 0.6931471805599453f;

SIRL_HD RawExtState raw_ext_empty() { return RawExtState{raw_empty(), 0.0f, 0.0f, 0.0f}; }

template <int kN>
SIRL_HD RawExtState raw_update(RawExtState st, const float (&x)[kN], float k) {
  float m = st.base.max;
SIRL_CUDA_UNROLL
  for (int i = 0; i < kN; ++i) m = fmaxf(m, x[i]);
  const float delta = (st.base.max == m) ? 0.0f : st.base.max - m;
  const float c = delta * k;
  const float a = fast_exp2(c);
  const float ad = (a == 0.0f) ? 0.0f : a * delta;
  float s = a * st.base.sum;
  float w = fmaf(ad, st.base.sum, a * st.base.wsum);
  const float q_shift = (a == 0.0f) ? 0.0f : a * c * fmaf(2.0f * k, st.base.wsum, c * st.base.sum);
  float q = fmaf(a, st.qsum, q_shift);
  float u = (st.count == 0.0f) ? st.dsum : fmaf(st.count, c, st.dsum);
  const float m_safe = (m == -INFINITY) ? 0.0f : m;
SIRL_CUDA_UNROLL
  for (int i = 0; i < kN; ++i) {
    const float d = x[i] - m_safe;
    const float t = d * k;
    const float e = fast_exp2(t);
    s += e;
    w = fmaf(e, fmaxf(d, kNegMax), w);
    u += t;
    const float tc = fmaxf(t, kNegMax);
    q = fmaf(e * tc, tc, q);
  }
  return RawExtState{RawState{m, s, w}, st.count + static_cast<float>(kN), u, q};
}

// The state for the header's merge in raw units (sirl::merge_scaled with inv_t, as the CPU kernels keep theirs):
// max stays the raw max (differences of maxima are exact, then scaled), the sums are the header's (sumexp, and
// wsum in z units). A NaN sum is the NaN state (its max may be -inf when the NaN sat among -inf only: the empty
// state a merge would drop); a max of -inf otherwise is the empty state.
SIRL_HD sirl::OnlineState raw_to_scaled(RawState st, float inv_t) {
  if (st.sum != st.sum) return sirl::nan_state();
  if (st.max == -INFINITY) return sirl::empty_state();
  return sirl::OnlineState{st.max, st.sum, st.wsum * inv_t};
}

// raw_to_scaled with the extras, moved from log2 units to z units (t = d_z log2 e).
SIRL_HD sirl::ExtState raw_to_scaled(RawExtState st, float inv_t) {
  if (st.base.sum != st.base.sum) return sirl::ext_nan_state(st.count);
  if (st.base.max == -INFINITY) return sirl::ExtState{sirl::empty_state(), sirl::ExtraSums{st.count, st.dsum, 0.0f}};
  return sirl::ExtState{sirl::OnlineState{st.base.max, st.base.sum, st.base.wsum * inv_t},
                        sirl::ExtraSums{st.count, st.dsum * kLn2, st.qsum * (kLn2 * kLn2)}};
}

// A row's result from its merged raw-max state: the stats are (raw max, log sumexp), and
// logprob = (x_label - max) / T - log sumexp (the difference before the scaling: exact under a common offset).
SIRL_HD sirl::RowResult finish_raw(sirl::OnlineState st, float x_label, float inv_t) {
  sirl::RowResult r = sirl::finalize_stats(st);
  r.logprob = (x_label - r.max) * inv_t - r.log_sum;
  return r;
}

// The backward's per-row constants, from the forward's stats (raw max, log_sum) and the row's coefficients of the
// backward form (online_state.h: grad_nonlabel). With u = (x - max) / T (the difference before the scaling) and
// log p = u - log_sum:
//   non-label dz = p (alpha + beta log p) / T = (p / T) (c1 u + c0),
//   c1 = beta, c0 = alpha - beta log_sum, p / T = 2^(u log2e + b), b = log2(1/T) - log_sum log2e.
// The chain rule's 1/T sits in the exponent, so no constant grows with it: c1 = beta / T times a clamped u overflowed
// once |beta| / T > ~2.5e36 (T near the API's smallest, 1.2e-38), and then p = 0 times inf was NaN. Here every factor
// is finite for any temperature the API accepts (2^(...) <= 2^126 since u <= 0, log_sum >= 0 and 1/T <= 2^126), so
// the product is inf only where the gradient itself is out of fp32 range. Below u_min, where the exponent reaches
// kExp2Zero, p / T is 0 in fp32 and u is clamped there (|c1 u_min| <= 226 |beta|, a -inf logit gives exactly 0).
// A NaN row has NaN stats, hence a NaN exponent and NaN everywhere.
struct GradRow {
  float max;
  float inv_t;
  float u_min;
  float b;
  float c1;
  float c0;
};

SIRL_HD GradRow grad_row(float max, float log_sum, float alpha, float beta, float inv_t) {
  const float b = log2f(inv_t) - log_sum * kLog2e;
  return GradRow{max, inv_t, (kExp2Zero - b) / kLog2e, b, beta, alpha - beta * log_sum};
}

// d/dx of a non-label logit x (raw): a subtract, a multiply, a clamp, 2 FMAs, an exp2 and a multiply.
SIRL_HD float grad_nonlabel_fast(float x, const GradRow& r) {
  const float u = fmaxf((x - r.max) * r.inv_t, r.u_min);
  return fast_exp2(fmaf(u, kLog2e, r.b)) * fmaf(u, r.c1, r.c0);
}

// The backward's specialised form with gamma and delta (online_state.h's grad_nonlabel with them): with
// L = u - log_sum (u clamped at u_min, so L is finite and p / T = 0 exactly there),
//   dz = (p / T) (alpha + L (beta + gamma L)) + delta / T,   so p = 0 columns are exactly delta / T.
struct GradTerms {
  float log_sum;
  float alpha;
  float beta;
  float gamma;
  float delta_t;  // delta / T (as delta * inv_t)
};

SIRL_HD float grad_nonlabel_terms(float x, const GradRow& r, const GradTerms& g) {
  const float u = fmaxf((x - r.max) * r.inv_t, r.u_min);
  const float logp = u - g.log_sum;
  return fmaf(fast_exp2(fmaf(u, kLog2e, r.b)), fmaf(logp, fmaf(logp, g.gamma, g.beta), g.alpha), g.delta_t);
}

// d/dx of the label logit: (p (alpha + lam + beta log p) - lam expm1(log p)) / T, lam (1 - p) exact near p = 1 and
// the p term 0 where p is (header: sirl::grad_label).
SIRL_HD float grad_label_raw(float x, const GradRow& r, float log_sum, float alpha, float beta, float lam) {
  return sirl::grad_label((x - r.max) * r.inv_t - log_sum, alpha, beta, lam, r.inv_t);
}

// The label's, with gamma and delta (header: sirl::grad_label with them).
SIRL_HD float grad_label_raw(float x, const GradRow& r, float log_sum, float alpha, float beta, float lam, float gamma,
                             float delta) {
  return sirl::grad_label((x - r.max) * r.inv_t - log_sum, alpha, beta, lam, gamma, delta, r.inv_t);
}

}  // namespace sirl_cuda
