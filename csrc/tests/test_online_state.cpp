// Unit tests of csrc/include/sirl/online_state.h against long-double references.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <random>
#include <vector>

#include "check.h"

#include "sirl/online_state.h"

using sirl::OnlineState;

struct Ref {
  long double lse, entropy;
};

static Ref reference(const std::vector<float>& z) {
  long double m = -INFINITY;
  for (float v : z) m = v > m ? v : m;
  long double s = 0, w = 0;
  for (float v : z) {
    if (v == -INFINITY) continue;
    const long double e = expl((long double)v - m);
    s += e;
    w += e * ((long double)v - m);
  }
  return Ref{m + logl(s), logl(s) - w / s};
}

static OnlineState sequential(const std::vector<float>& z, size_t b, size_t e) {
  OnlineState s = sirl::empty_state();
  for (size_t i = b; i < e; ++i) s = sirl::update(s, z[i]);
  return s;
}

// Merges [b, e) as a random binary tree.
static OnlineState tree(const std::vector<float>& z, size_t b, size_t e, std::mt19937& rng) {
  if (e - b <= 3) return sequential(z, b, e);
  std::uniform_int_distribution<size_t> cut(b + 1, e - 1);
  const size_t c = cut(rng);
  return sirl::merge(tree(z, b, c, rng), tree(z, c, e, rng));
}

static bool close(long double got, long double want, long double rtol, long double atol) {
  return fabsl(got - want) <= atol + rtol * fabsl(want);
}

static bool same_bits(float a, float b) { return memcmp(&a, &b, sizeof(float)) == 0; }

// The row's log-sum-exp from its stats (only the tests need it: the kernels never form it).
static long double lse_of(const sirl::RowResult& r) { return (long double)r.max + r.log_sum; }

static void test_random_rows() {
  std::mt19937 rng(1234);
  const int sizes[] = {1, 2, 7, 64, 1000, 4099, 50000};
  const float scales[] = {0.1f, 3.0f, 30.0f, 1000.0f};
  for (int n : sizes) {
    for (float scale : scales) {
      std::normal_distribution<float> nd(0.0f, scale);
      std::uniform_real_distribution<float> u(0.0f, 1.0f);
      std::vector<float> z(n);
      for (auto& v : z) v = u(rng) < 0.2f ? -INFINITY : nd(rng);
      z[n / 2] = nd(rng);  // at least one finite entry
      const Ref ref = reference(z);
      const OnlineState seq = sequential(z, 0, n);
      const OnlineState tr = tree(z, 0, n, rng);
      for (const OnlineState& st : {seq, tr}) {
        const sirl::RowResult r = sirl::finalize(st, z[n / 2]);
        // lse: relative to its magnitude plus the fp32 rounding of log(sum) (n terms, each <= 1 ulp-ish).
        CHECK(close(lse_of(r), ref.lse, 2e-6L, 2e-6L * (1 + log((double)n))), "n=%d scale=%g lse %.9Lg vs %.12Lg",
              n, scale, lse_of(r), ref.lse);
        CHECK(close(r.entropy, ref.entropy, 1e-5L, 1e-5L), "n=%d scale=%g entropy %.9g vs %.12Lg", n, scale,
              r.entropy, ref.entropy);
        CHECK(close(r.logprob, (long double)z[n / 2] - ref.lse, 2e-6L, 2e-6L * (1 + log((double)n))),
              "n=%d logprob", n);
      }
      // Associativity (up to rounding) and bitwise commutativity of merge.
      if (n >= 3) {
        const size_t a = n / 3, b = 2 * n / 3;
        const OnlineState x = sequential(z, 0, a), y = sequential(z, a, b), w = sequential(z, b, n);
        const OnlineState l = sirl::merge(sirl::merge(x, y), w), r = sirl::merge(x, sirl::merge(y, w));
        CHECK(l.max == r.max, "max must be exact");
        CHECK(close(l.sumexp, r.sumexp, 1e-6L, 0), "assoc sumexp %.9g vs %.9g", l.sumexp, r.sumexp);
        CHECK(close(l.wsum, r.wsum, 1e-5L, 1e-6L * fabsl(l.sumexp)), "assoc wsum %.9g vs %.9g", l.wsum, r.wsum);
        const OnlineState c1 = sirl::merge(x, y), c2 = sirl::merge(y, x);
        CHECK(same_bits(c1.max, c2.max) && same_bits(c1.sumexp, c2.sumexp) && same_bits(c1.wsum, c2.wsum),
              "merge must be bitwise commutative");
      }
    }
  }
}

static void test_merge_exactness() {
  // Identity: merging with the empty state returns the other state bit for bit.
  const OnlineState a{1.5f, 3.25f, -0.75f};
  for (const OnlineState& r : {sirl::merge(a, sirl::empty_state()), sirl::merge(sirl::empty_state(), a)}) {
    CHECK(same_bits(r.max, a.max) && same_bits(r.sumexp, a.sumexp) && same_bits(r.wsum, a.wsum), "identity");
  }
  // Equal maxes: plain sums, exact for representable values.
  const OnlineState b{1.5f, 2.0f, -0.5f};
  const OnlineState ab = sirl::merge(a, b);
  CHECK(ab.max == 1.5f && ab.sumexp == 5.25f && ab.wsum == -1.25f, "equal-max merge");
  // Exact rescaling: d = -ln 2 is not representable, but d = -1 gives scale e^-1: compare to double.
  const OnlineState c{0.5f, 1.0f, 0.0f};
  const OnlineState bc = sirl::merge(b, c);
  CHECK(close(bc.sumexp, 2.0L + expl(-1.0L), 1e-7L, 0), "rescaled sumexp %.9g", bc.sumexp);
  CHECK(close(bc.wsum, -0.5L - expl(-1.0L), 1e-7L, 0), "rescaled wsum %.9g", bc.wsum);
  // A hugely smaller max underflows to a zero contribution, never NaN.
  const OnlineState far{-1e30f, 5.0f, -1.0f};
  const OnlineState af = sirl::merge(a, far);
  CHECK(af.max == a.max && af.sumexp == a.sumexp && af.wsum == a.wsum, "underflowed merge");
}

static void test_neg_inf() {
  const OnlineState e = sirl::singleton_state(-INFINITY);
  CHECK(e.max == -INFINITY && e.sumexp == 0.0f && e.wsum == 0.0f, "singleton(-inf) is empty");
  const OnlineState one = sirl::singleton_state(2.0f);
  const OnlineState u = sirl::update(one, -INFINITY);
  CHECK(same_bits(u.max, one.max) && same_bits(u.sumexp, one.sumexp) && same_bits(u.wsum, one.wsum),
        "update(-inf) changes nothing");
  const OnlineState ee = sirl::merge(sirl::empty_state(), sirl::empty_state());
  CHECK(ee.max == -INFINITY && ee.sumexp == 0.0f && ee.wsum == 0.0f, "empty + empty");
  // Finite entries after -inf ones: no NaN from (-inf) - (-inf).
  OnlineState s = sirl::empty_state();
  s = sirl::update(s, -INFINITY);
  s = sirl::update(s, 1.0f);
  s = sirl::update(s, -INFINITY);
  s = sirl::update(s, 1.0f);
  const sirl::RowResult r = sirl::finalize(s, 1.0f);
  CHECK(close(lse_of(r), 1.0L + logl(2.0L), 1e-7L, 0), "lse %.9Lg", lse_of(r));
  CHECK(close(r.entropy, logl(2.0L), 1e-7L, 1e-7L), "entropy %.9g", r.entropy);
  // A single finite entry: entropy exactly 0, logprob exactly 0.
  const sirl::RowResult single = sirl::finalize(sirl::update(sirl::empty_state(), 7.0f), 7.0f);
  CHECK(single.entropy == 0.0f && single.logprob == 0.0f && single.max == 7.0f && single.log_sum == 0.0f,
        "single entry");
  // All -inf: NaN logprob and entropy (like PyTorch), stats (-inf, -inf).
  const sirl::RowResult all = sirl::finalize(sirl::empty_state(), -INFINITY);
  CHECK(all.max == -INFINITY && all.log_sum == -INFINITY && isnan(all.entropy) && isnan(all.logprob),
        "all -inf row: max %g log_sum %g entropy %g logprob %g", all.max, all.log_sum, all.entropy, all.logprob);
  // Label at -inf in a finite row: logprob -inf.
  CHECK(sirl::finalize(s, -INFINITY).logprob == -INFINITY, "label at -inf");
}

static void test_finalize_uniform() {
  for (int n : {1, 2, 10, 1000, 151936}) {
    OnlineState s = sirl::empty_state();
    for (int i = 0; i < n; ++i) s = sirl::update(s, 0.25f);
    const sirl::RowResult r = sirl::finalize(s, 0.25f);
    CHECK(close(r.entropy, logl(n), 1e-6L, 1e-6L), "uniform n=%d entropy %.9g", n, r.entropy);
    CHECK(close(r.logprob, -logl(n), 1e-6L, 1e-6L), "uniform n=%d logprob %.9g", n, r.logprob);
    CHECK(r.entropy >= 0.0f, "entropy clamped at 0");
  }
}

static void test_grads() {
  std::mt19937 rng(99);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + trial * 7;
    std::vector<float> z(n);
    for (auto& v : z) v = nd(rng);
    if (trial % 5 == 1) z[0] = -INFINITY;
    const float inv_t = trial % 3 == 0 ? 1.0f : 1.0f / 0.7f;
    std::vector<float> zs(n);
    for (int i = 0; i < n; ++i) zs[i] = z[i] * inv_t;
    const Ref ref = reference(zs);
    const sirl::RowResult rr = sirl::finalize(sequential(zs, 0, n), zs[n - 1]);
    // The coefficients of g_lp * logprob + g_h * entropy (alpha = -g_lp - g_h H, beta = -g_h, lam = g_lp), of the
    // same with lam = 0 (a rank that does not own the label), or arbitrary ones.
    const float g_lp = nd(rng), g_h = nd(rng);
    float alpha = -g_lp - g_h * rr.entropy, beta = -g_h, lam = g_lp;
    if (trial % 4 == 1) lam = 0.0f;
    if (trial % 4 == 2) alpha = nd(rng), beta = nd(rng), lam = nd(rng);
    const auto logp = [&](int i) { return sirl::log_prob(zs[i], rr.max, rr.log_sum); };
    long double max_abs = 0;
    std::vector<long double> want(n);
    for (int i = 0; i < n; ++i) {
      const long double logp = (long double)zs[i] - ref.lse, p = expl(logp);
      const long double p_term = p == 0 ? 0 : p * (alpha + beta * logp);
      want[i] = (p_term + (i == n - 1 ? lam : 0)) * (long double)inv_t;
      max_abs = fmaxl(max_abs, fabsl(want[i]));
    }
    for (int i = 0; i < n; ++i) {
      const float got = i == n - 1 ? sirl::grad_label(logp(i), alpha, beta, lam, inv_t)
                                   : sirl::grad_nonlabel(logp(i), alpha, beta, inv_t);
      CHECK(!isnan(got), "grad NaN at %d", i);
      // fp32 H and the coefficients' own sums cancel (alpha + beta log p ~ -g_h (log p + H)): an absolute error of
      // a few ulp of the coefficients, times p / T <= 1 / T.
      const long double scale = fmaxl(max_abs, 1) + (fabsl(alpha) + fabsl(beta) + fabsl(lam)) * inv_t;
      CHECK(close(got, want[i], 1e-4L, 1e-5L * scale), "trial %d i=%d grad %.9g vs %.12Lg", trial, i, got, want[i]);
      if (z[i] == -INFINITY) CHECK(got == 0.0f, "-inf entry must get exactly 0, got %g", got);
    }
  }
  // p_y -> 1: with the label at 0 and 999 others at -20, 1 - p_y ~ 2.06e-6 and lse ~ 2.06e-6 is representable to
  // full relative precision; -expm1(log p_y) keeps it, where 1 - exp(log p_y) would lose ~3% to fp32 rounding.
  const int n = 1000;
  std::vector<float> z(n, -20.0f);
  z[11] = 0.0f;
  const Ref ref = reference(z);
  // The 999 others summed in their own frame, then merged (as the kernels do per block): adding 2e-9 terms to 1 one
  // by one would round every one of them away.
  const OnlineState others = sirl::merge(sequential(z, 0, 11), sequential(z, 12, n));
  const sirl::RowResult rr = sirl::finalize(sirl::merge(others, sirl::singleton_state(0.0f)), 0.0f);
  const float logp_y = sirl::log_prob(0.0f, rr.max, rr.log_sum);
  const float got = sirl::grad_label(logp_y, -1.0f, 0.0f, 1.0f, 1.0f);  // g_lp = 1: alpha = -1, lam = 1
  // Exact relative to the fp32 log p_y (whose own rounding, ~ulp(1) in sumexp, is the state's, not this function's).
  const long double want = -expm1l((long double)logp_y);
  CHECK(close(got, want, 1e-6L, 0), "1 - p_y: %.9g vs %.12Lg", got, want);
  CHECK(close(lse_of(rr), ref.lse, 0.05L, 0), "lse of the p_y -> 1 row: %.9Lg vs %.12Lg", lse_of(rr), ref.lse);
  // Label at -inf: p = 0, gradient lam / T exactly, no NaN (g_lp = 2, g_h = 3, H = 0.5: alpha = -3.5, beta = -3).
  const float at_ninf = sirl::log_prob(-INFINITY, 1.0f, 0.5f);
  CHECK(sirl::grad_label(at_ninf, -3.5f, -3.0f, 2.0f, 0.5f) == 1.0f, "label at -inf");
  CHECK(sirl::grad_label(at_ninf, -3.5f, -3.0f, 0.0f, 0.5f) == 0.0f, "label at -inf, lam = 0");
  CHECK(sirl::grad_nonlabel(at_ninf, -3.5f, -3.0f, 0.5f) == 0.0f, "non-label at -inf");
  // Far below the max (p underflows to 0): exactly 0, never 0 * huge.
  CHECK(sirl::grad_nonlabel(sirl::log_prob(-1e30f, 0.0f, 0.0f), 1.0f, 1.0f, 1.0f) == 0.0f, "underflowed p");
  // A NaN row's gradient is NaN.
  CHECK(isnan(sirl::grad_nonlabel(sirl::log_prob(1.0f, 0.0f, NAN), 0.5f, 1.0f, 1.0f)), "NaN row gradient");
}

// NaN anywhere in a row, whatever the order of updates and merges, gives NaN logprob, entropy and stats; +inf
// gives NaN logprob and entropy (exp(inf - inf)); the row [NaN, 1, 2] of issue 12 once gave a finite lse.
static void test_nan_and_inf_poison() {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (float bad : {NAN, INFINITY}) {
    for (int n : {1, 2, 3, 7, 64, 1000}) {
      for (int pos : {0, n / 2, n - 1}) {
        std::vector<float> z(n);
        for (auto& v : z) v = nd(rng);
        if (n > 2) z[(pos + 1) % n] = -INFINITY;  // -inf neighbours must not hide it either
        z[pos] = bad;
        for (const OnlineState& st : {sequential(z, 0, n), tree(z, 0, n, rng)}) {
          for (int label : {0, pos, n - 1}) {
            const sirl::RowResult r = sirl::finalize(st, z[label]);
            CHECK(isnan(r.logprob) && isnan(r.entropy), "bad=%g n=%d pos=%d label=%d: logprob %g entropy %g", bad,
                  n, pos, label, r.logprob, r.entropy);
            if (bad != bad) CHECK(isnan(r.max) && isnan(r.log_sum), "NaN n=%d pos=%d: stats %g %g", n, pos, r.max,
                                  r.log_sum);
          }
        }
      }
    }
  }
  // Merging a NaN state with anything, on either side, keeps it NaN; and the row.
  const OnlineState nan_first = sirl::update(sirl::empty_state(), NAN);
  for (const OnlineState& other : {sirl::empty_state(), sirl::singleton_state(2.0f), OnlineState{1e30f, 1, 0}}) {
    CHECK(isnan(sirl::merge(nan_first, other).max) && isnan(sirl::merge(other, nan_first).max), "NaN merge");
  }
  OnlineState s = sirl::empty_state();
  for (float v : {NAN, 1.0f, 2.0f}) s = sirl::update(s, v);
  CHECK(isnan(sirl::finalize(s, 1.0f).log_sum), "[NaN, 1, 2]: log_sum %g", sirl::finalize(s, 1.0f).log_sum);
}

// A common offset c on exactly representable logits costs nothing: logprob = (z_y - max) - log s.
static void test_large_common_offset() {
  for (float c : {1e4f, 1e5f, 1e6f}) {
    const std::vector<float> z = {2.0f + c, -1.0f + c};
    const sirl::RowResult r = sirl::finalize(sequential(z, 0, 2), z[0]);
    const long double want = -log1pl(expl(-3.0L));
    CHECK(fabsl(r.logprob - want) <= 1e-7L, "c=%g logprob %.9g vs %.12Lg", c, r.logprob, want);
    const long double p1 = expl(-3.0L) / (1 + expl(-3.0L)), p0 = 1 - p1;
    const long double h = -(p0 * logl(p0) + p1 * logl(p1));
    CHECK(fabsl(r.entropy - h) <= 1e-7L, "c=%g entropy %.9g vs %.12Lg", c, r.entropy, h);
  }
}

// ---- self-certainty and varentropy (ExtState) -------------------------------------------------------------------
struct ExtRef {
  long double sc, ve;
};

// long double references: SC = lse - mean(z) - log n, VE = sum p (log p)^2 - H^2.
static ExtRef ext_reference(const std::vector<float>& z) {
  long double m = -INFINITY, sum_z = 0;
  bool neg_inf = false;
  for (float v : z) {
    m = v > m ? v : m;
    if (v == -INFINITY) neg_inf = true;
    else sum_z += v;
  }
  long double s = 0;
  for (float v : z) s += v == -INFINITY ? 0.0L : expl((long double)v - m);
  const long double lse = m + logl(s);
  long double h = 0, q = 0;
  for (float v : z) {
    if (v == -INFINITY) continue;
    const long double lp = (long double)v - lse, p = expl(lp);
    h -= p * lp;
    q += p * lp * lp;
  }
  const long double n = (long double)z.size();
  return ExtRef{neg_inf ? (long double)INFINITY : lse - sum_z / n - logl(n), q - h * h};
}

static sirl::ExtState ext_sequential(const std::vector<float>& z, size_t b, size_t e) {
  sirl::ExtState s = sirl::ext_empty_state();
  for (size_t i = b; i < e; ++i) s = sirl::update(s, z[i]);
  return s;
}

static sirl::ExtState ext_tree(const std::vector<float>& z, size_t b, size_t e, std::mt19937& rng) {
  if (e - b <= 3) return ext_sequential(z, b, e);
  std::uniform_int_distribution<size_t> cut(b + 1, e - 1);
  const size_t c = cut(rng);
  return sirl::merge(ext_tree(z, b, c, rng), ext_tree(z, c, e, rng));
}

// Tolerances from fp32 rounding: every sum is a chain of at most n fp32 roundings (eps = 2^-24 each), so dsum is
// within ~n eps sum|d| and the finalized mean(d) within n eps mean|d|; SC adds log s and log n (a few eps each).
// Varentropy is q/s - (w/s)^2: its cancellation leaves ~n eps (E[d^2] + E[d]^2) (d = z - max, E under p).
static void check_ext(const std::vector<float>& z, const sirl::ExtState& st, const char* what) {
  const ExtRef want = ext_reference(z);
  const sirl::ExtraResult got = sirl::finalize_extras(st.s, st.x);
  const long double eps = 5.96e-8L, n = (long double)z.size();
  long double m = -INFINITY, mean_abs_d = 0;
  for (float v : z) m = v > m ? v : m;
  for (float v : z) mean_abs_d += v == -INFINITY ? 0.0L : fabsl((long double)v - m) / n;
  const long double sc_tol = 8 * n * eps * (mean_abs_d + 1) + 16 * eps * fabsl(want.sc);
  const long double e_d2 = want.ve + 1.0L;  // a bound scale: E[d^2] <= VE + E[d]^2, with E[d] = -(H + log-ish)
  long double ed = 0, ed2 = 0;
  {
    long double s = 0;
    for (float v : z) s += v == -INFINITY ? 0.0L : expl((long double)v - m);
    for (float v : z) {
      if (v == -INFINITY) continue;
      const long double d = (long double)v - m, p = expl(d) / s;
      ed += p * d;
      ed2 += p * d * d;
    }
  }
  const long double ve_tol = 8 * n * eps * (ed2 + ed * ed + e_d2);
  CHECK(want.sc == INFINITY ? got.self_certainty == INFINITY : close(got.self_certainty, want.sc, 0, sc_tol),
        "%s: n=%zu self-certainty %.9g vs %.9Lg", what, z.size(), got.self_certainty, want.sc);
  CHECK(close(got.varentropy, want.ve, 0, ve_tol), "%s: n=%zu varentropy %.9g vs %.9Lg", what, z.size(),
        got.varentropy, want.ve);
}

static void test_extras_random_and_order() {
  std::mt19937 rng(99);
  const int sizes[] = {1, 2, 7, 64, 1000, 4099};
  const float scales[] = {0.1f, 3.0f, 30.0f};
  for (int n : sizes) {
    for (float scale : scales) {
      std::normal_distribution<float> dist(0.0f, scale);
      std::vector<float> z(n);
      for (float& v : z) v = dist(rng);
      const sirl::ExtState seq = ext_sequential(z, 0, z.size());
      check_ext(z, seq, "sequential");
      for (int t = 0; t < 3; ++t) check_ext(z, ext_tree(z, 0, z.size(), rng), "tree");
      // a common offset: the extras are shift-invariant
      std::vector<float> zo(z);
      for (float& v : zo) v += 1e4f;
      check_ext(zo, ext_tree(zo, 0, zo.size(), rng), "offset 1e4");
      // merge order independence within rounding: a tree and the sequential order agree
      const sirl::ExtState tr = ext_tree(z, 0, z.size(), rng);
      const sirl::ExtraResult a = sirl::finalize_extras(seq.s, seq.x), b = sirl::finalize_extras(tr.s, tr.x);
      CHECK(close(a.self_certainty, b.self_certainty, 1e-4L, 1e-4L) && close(a.varentropy, b.varentropy, 1e-4L, 1e-4L),
            "order n=%d: %.9g/%.9g vs %.9g/%.9g", n, a.self_certainty, a.varentropy, b.self_certainty, b.varentropy);
      CHECK(tr.x.count == (float)n && seq.x.count == (float)n, "count %g", tr.x.count);
    }
  }
}

// The rescale rules on their own: a state moved to a max higher by -c equals the state built at that max.
static void test_extras_rescale() {
  const std::vector<float> z = {0.5f, -1.25f, 0.0f, -3.0f, 0.25f};
  // built with max 0.5, then merged with a singleton 2.5: its extras are rescaled by c = 0.5 - 2.5 = -2
  sirl::ExtState st = ext_sequential(z, 0, z.size());
  const sirl::ExtState merged = sirl::merge(st, sirl::ext_singleton_state(2.5f));
  long double dsum = 0, qsum = 0;
  for (float v : z) {
    const long double d = (long double)v - 2.5L;
    dsum += d;
    qsum += expl(d) * d * d;
  }
  // the singleton itself: d = 0
  CHECK(close(merged.x.dsum, dsum, 1e-6L, 1e-6L), "rescaled dsum %.9g vs %.9Lg", merged.x.dsum, dsum);
  CHECK(close(merged.x.qsum, qsum, 1e-5L, 1e-7L), "rescaled qsum %.9g vs %.9Lg", merged.x.qsum, qsum);
  CHECK(merged.x.count == 6.0f, "count %g", merged.x.count);
  // merge commutes (the swap puts the larger max first)
  const sirl::ExtState other = sirl::merge(sirl::ext_singleton_state(2.5f), st);
  CHECK(same_bits(other.x.dsum, merged.x.dsum) && same_bits(other.x.qsum, merged.x.qsum), "merge commutes");
  // scaled merge: the max difference in raw units times inv_t, the extras in z units
  sirl::ExtState a{sirl::OnlineState{4.0f, 1.0f, 0.0f}, sirl::ExtraSums{1.0f, 0.0f, 0.0f}};
  sirl::ExtState b{sirl::OnlineState{2.0f, 1.0f, 0.0f}, sirl::ExtraSums{1.0f, 0.0f, 0.0f}};
  const sirl::ExtState ab = sirl::merge_scaled(a, b, 0.5f);  // b's d in z units: (2 - 4) * 0.5 = -1
  CHECK(ab.x.dsum == -1.0f, "scaled dsum %g", ab.x.dsum);
  CHECK(close(ab.x.qsum, expl(-1.0L), 1e-6L, 0), "scaled qsum %.9g", ab.x.qsum);
}

static void test_extras_special_values() {
  const float inf = INFINITY, nan = NAN;
  // a -inf logit: self-certainty +inf, varentropy that of the rest
  {
    const std::vector<float> z = {1.0f, -inf, 0.0f, 2.0f};
    const sirl::ExtState st = ext_sequential(z, 0, z.size());
    const sirl::ExtraResult r = sirl::finalize_extras(st.s, st.x);
    CHECK(r.self_certainty == inf, "-inf logit: self-certainty %g", r.self_certainty);
    const std::vector<float> rest = {1.0f, 0.0f, 2.0f};
    CHECK(close(r.varentropy, ext_reference(rest).ve, 1e-5L, 1e-6L), "-inf logit: varentropy %g", r.varentropy);
    // -inf first, and a -inf-only part merged in either order
    const sirl::ExtState parts = sirl::merge(ext_sequential({-inf, -inf}, 0, 2), ext_sequential(rest, 0, 3));
    CHECK(sirl::finalize_extras(parts.s, parts.x).self_certainty == inf, "-inf part first");
    const sirl::ExtState parts2 = sirl::merge(ext_sequential(rest, 0, 3), ext_sequential({-inf}, 0, 1));
    CHECK(sirl::finalize_extras(parts2.s, parts2.x).self_certainty == inf, "-inf part last");
  }
  // all -inf: NaN both
  {
    const std::vector<float> z = {-inf, -inf, -inf};
    const sirl::ExtState st = ext_sequential(z, 0, z.size());
    const sirl::ExtraResult r = sirl::finalize_extras(st.s, st.x);
    CHECK(r.self_certainty != r.self_certainty && r.varentropy != r.varentropy, "all -inf: %g %g",
          r.self_certainty, r.varentropy);
  }
  // NaN or +inf anywhere: NaN both, whatever the merge order
  for (float bad : {nan, inf}) {
    for (size_t at = 0; at < 4; ++at) {
      std::vector<float> z = {1.0f, -inf, 0.0f, 2.0f};
      z[at] = bad;
      const sirl::ExtState st = ext_sequential(z, 0, z.size());
      const sirl::ExtraResult r = sirl::finalize_extras(st.s, st.x);
      CHECK(r.self_certainty != r.self_certainty && r.varentropy != r.varentropy, "%g at %zu: %g %g", bad, at,
            r.self_certainty, r.varentropy);
      const sirl::ExtState m2 = sirl::merge(ext_sequential(z, 2, 4), ext_sequential(z, 0, 2));
      const sirl::ExtraResult r2 = sirl::finalize_extras(m2.s, m2.x);
      CHECK(r2.self_certainty != r2.self_certainty && r2.varentropy != r2.varentropy, "%g at %zu, merged", bad, at);
    }
  }
  // one column: both 0; a uniform row: both 0
  {
    const sirl::ExtState one = ext_sequential({3.5f}, 0, 1);
    const sirl::ExtraResult r = sirl::finalize_extras(one.s, one.x);
    CHECK(r.self_certainty == 0.0f && r.varentropy == 0.0f, "V=1: %g %g", r.self_certainty, r.varentropy);
    const std::vector<float> u(1000, -2.0f);
    const sirl::ExtState st = ext_sequential(u, 0, u.size());
    const sirl::ExtraResult ru = sirl::finalize_extras(st.s, st.x);
    CHECK(fabsf(ru.self_certainty) < 1e-4f && ru.varentropy == 0.0f, "uniform: %g %g", ru.self_certainty,
          ru.varentropy);
  }
  // maxima of opposite huge signs: b underflows entirely (scale 0, c = -inf): qsum adds 0, dsum -inf
  {
    const sirl::ExtState a = ext_sequential({3e38f}, 0, 1), b = ext_sequential({-3e38f}, 0, 1);
    const sirl::ExtState m = sirl::merge(b, a);
    CHECK(m.x.qsum == 0.0f && m.x.dsum == -inf, "opposite huge maxima: q %g d %g", m.x.qsum, m.x.dsum);
  }
}

// The backward form's optional terms against long double.
static void test_grads_with_terms() {
  const float inv_ts[] = {1.0f, 2.0f, 0.5f};
  const float logps[] = {-0.01f, -0.7f, -3.0f, -20.0f, -80.0f, -INFINITY};
  for (float inv_t : inv_ts) {
    for (float lp : logps) {
      const float alpha = 0.3f, beta = -1.1f, gamma = 0.7f, delta = -0.25f, lam = 0.9f;
      const long double p = lp == -INFINITY ? 0.0L : expl((long double)lp);
      const long double want_nl = lp == -INFINITY
                                      ? (long double)delta * inv_t
                                      : (p * (alpha + beta * (long double)lp + gamma * (long double)lp * lp) + delta) * inv_t;
      const float got_nl = sirl::grad_nonlabel(lp, alpha, beta, gamma, delta, inv_t);
      CHECK(lp == -INFINITY ? got_nl == delta * inv_t : close(got_nl, want_nl, 1e-5L, 1e-6L),
            "nonlabel lp=%g: %.9g vs %.9Lg", lp, got_nl, want_nl);
      const long double p_term =
          p == 0 ? 0.0L : p * (alpha + lam + beta * (long double)lp + gamma * (long double)lp * lp);
      const long double want_l = (p_term - lam * expm1l((long double)lp) + delta) * inv_t;
      const float got_l = sirl::grad_label(lp, alpha, beta, lam, gamma, delta, inv_t);
      CHECK(close(got_l, want_l, 1e-5L, 1e-6L), "label lp=%g: %.9g vs %.9Lg", lp, got_l, want_l);
    }
  }
}

int main() {
  test_random_rows();
  test_nan_and_inf_poison();
  test_large_common_offset();
  test_merge_exactness();
  test_neg_inf();
  test_finalize_uniform();
  test_grads();
  test_extras_random_and_order();
  test_extras_rescale();
  test_extras_special_values();
  test_grads_with_terms();
  printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
