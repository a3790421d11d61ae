// The torch-free CPU row kernels (csrc/cpu/isa_*.cpp) against long-double references, for every ISA build the
// running CPU supports. The baseline build is compiled with no -m flags, exactly as in libsirl_cpu.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <random>
#include <vector>

#include "check.h"

#include "kernels.h"
#include "sirl/c_api.h"

struct Isa {
  const char* name;
  bool supported;
  decltype(&sirl_cpu::baseline::forward_rows) forward_rows;
  decltype(&sirl_cpu::baseline::backward_rows) backward_rows;
  decltype(&sirl_cpu::baseline::exp_array) exp_array;
  decltype(&sirl_cpu::baseline::convert_array) convert_array;
};

static uint32_t bits(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
}

static long double ulp_error(float got, long double want) {
  if (isinf(want) || want == 0) return got == (float)want ? 0 : INFINITY;
  const float w = (float)want;
  const float ulp = nextafterf(fabsf(w), INFINITY) - fabsf(w);
  return fabsl((long double)got - want) / ulp;
}

static void test_exp(const Isa& isa) {
  std::vector<float> x;
  for (float v = -104.0f; v <= 89.0f; v += 0.0137f) x.push_back(v);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-86.0f, 88.0f);
  for (int i = 0; i < 200000; ++i) x.push_back(u(rng));
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, -INFINITY, INFINITY, -1e30f, 1e30f, 88.7f, -86.5f, -87.2f})
    x.push_back(v);
  std::vector<float> y(x.size()), yn(x.size());
  isa.exp_array(x.data(), y.data(), (int64_t)x.size(), 0);
  isa.exp_array(x.data(), yn.data(), (int64_t)x.size(), 1);
  long double worst = 0, worst_nonpos = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const long double want = expl((long double)x[i]);
    if (x[i] < -86.6f) {
      CHECK(y[i] == 0.0f, "%s exp(%g) = %g must flush to 0", isa.name, x[i], y[i]);
    } else if (x[i] > 88.72283f) {
      CHECK(y[i] == INFINITY, "%s exp(%g) = %g must be inf", isa.name, x[i], y[i]);
    } else if (want >= 1.1754943508e-38L) {
      worst = fmaxl(worst, ulp_error(y[i], want));
    }
    if (x[i] <= 0.0f) {
      if (x[i] < -87.3f) CHECK(yn[i] == 0.0f, "%s exp_nonpos(%g) = %g must be 0", isa.name, x[i], yn[i]);
      else if (want >= 1.1754943508e-38L) worst_nonpos = fmaxl(worst_nonpos, ulp_error(yn[i], want));
    }
  }
  const float nan_in = NAN;
  float nan_out = 0;
  isa.exp_array(&nan_in, &nan_out, 1, 0);
  CHECK(isnan(nan_out), "%s exp(NaN) must be NaN", isa.name);
  // The forward's base-2 exp: absolute error below 1 ulp of 1 (its terms are scaled so the row max gives 1), exact
  // 1 at 0 and exact 0 below 2^-126.5.
  std::vector<float> y2(x.size());
  isa.exp_array(x.data(), y2.data(), (int64_t)x.size(), 2);
  long double worst_abs2 = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!(x[i] <= 0.0f)) continue;
    if (x[i] < -87.69f) CHECK(y2[i] == 0.0f, "%s exp2_forward(%g) = %g must be 0", isa.name, x[i], y2[i]);
    worst_abs2 = fmaxl(worst_abs2, fabsl((long double)y2[i] - expl((long double)x[i])));
  }
  const float zero = 0.0f;
  float one = 0;
  isa.exp_array(&zero, &one, 1, 2);
  CHECK(one == 1.0f, "%s exp2_forward(0) = %g must be 1", isa.name, one);
  CHECK(worst_abs2 < 0x1p-23L, "%s exp2_forward worst absolute error %.3Lg", isa.name, worst_abs2);
  CHECK(worst <= 2.0L, "%s exp worst error %.3Lf ulp", isa.name, worst);
  CHECK(worst_nonpos <= 2.0L, "%s exp_nonpos worst error %.3Lf ulp", isa.name, worst_nonpos);
  printf("  %s: exp max error %.3Lf ulp, exp_nonpos %.3Lf ulp\n", isa.name, worst, worst_nonpos);
}

// bf16 reference: round to nearest even, NaN -> 0x7FC0.
static uint16_t ref_bf16(float f) {
  if (isnan(f)) return 0x7FC0;
  const uint32_t b = bits(f);
  return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

static void test_convert(const Isa& isa) {
  // Every half and every bfloat16 pattern to fp32 and back.
  std::vector<uint16_t> all(65536), back(65536);
  std::vector<float> f(65536);
  for (int i = 0; i < 65536; ++i) all[i] = (uint16_t)i;
  for (int code : {sirl_cpu::kBF16, sirl_cpu::kF16}) {
    isa.convert_array(code, all.data(), sirl_cpu::kF32, f.data(), 65536);
    isa.convert_array(sirl_cpu::kF32, f.data(), code, back.data(), 65536);
    int bad = 0;
    for (int i = 0; i < 65536; ++i) {
      const bool is_nan = isnan(f[i]);
      if (is_nan ? !(isnan(f[i]) && ((back[i] & 0x7FFF) > (code == sirl_cpu::kF16 ? 0x7C00 : 0x7F80)))
                 : back[i] != all[i])
        ++bad;
      if (code == sirl_cpu::kBF16 && !is_nan && bits(f[i]) != ((uint32_t)i << 16)) ++bad;
    }
    CHECK(bad == 0, "%s %s round trip: %d bad patterns", isa.name, code == sirl_cpu::kF16 ? "f16" : "bf16", bad);
  }
  // fp32 -> bf16 rounding of random values, ties included.
  std::mt19937 rng(3);
  std::vector<float> x(100000);
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t b = rng();
    if (i % 4 == 0) b = (b & 0xFFFF0000u) | 0x8000u;  // exact ties
    memcpy(&x[i], &b, 4);
  }
  std::vector<uint16_t> h(x.size());
  isa.convert_array(sirl_cpu::kF32, x.data(), sirl_cpu::kBF16, h.data(), (int64_t)x.size());
  int bad = 0;
  for (size_t i = 0; i < x.size(); ++i) bad += h[i] != ref_bf16(x[i]);
  CHECK(bad == 0, "%s fp32->bf16: %d mismatches", isa.name, bad);
  // fp32 -> f16: the result must be the nearest half (ties to even), checked through the exact f16 -> fp32 map.
  std::uniform_real_distribution<float> u(-70000.0f, 70000.0f);
  std::vector<float> y(100000);
  for (size_t i = 0; i < y.size(); ++i) y[i] = i % 2 ? u(rng) : u(rng) * 1e-6f;
  isa.convert_array(sirl_cpu::kF32, y.data(), sirl_cpu::kF16, h.data(), (int64_t)y.size());
  std::vector<float> yb(y.size());
  isa.convert_array(sirl_cpu::kF16, h.data(), sirl_cpu::kF32, yb.data(), (int64_t)y.size());
  bad = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (fabsf(y[i]) >= 65520.0f) {  // rounds to inf (65520 is a tie, to even = inf)
      bad += !isinf(yb[i]);
      continue;
    }
    // Neighbouring halves of the result must not be nearer.
    uint16_t up = (uint16_t)(h[i] + 1), dn = (uint16_t)(h[i] - 1);
    float fu, fd;
    isa.convert_array(sirl_cpu::kF16, &up, sirl_cpu::kF32, &fu, 1);
    isa.convert_array(sirl_cpu::kF16, &dn, sirl_cpu::kF32, &fd, 1);
    const double e = fabs((double)yb[i] - y[i]);
    if ((h[i] & 0x7FFF) != 0x7BFF && fabs((double)fu - y[i]) < e) ++bad;
    if ((h[i] & 0x7FFF) != 0 && fabs((double)fd - y[i]) < e) ++bad;
  }
  CHECK(bad == 0, "%s fp32->f16: %d not nearest", isa.name, bad);
}

struct RowRef {
  long double lse, entropy;
};

static RowRef row_reference(const float* z, int64_t v) {
  long double m = -INFINITY;
  for (int64_t i = 0; i < v; ++i) m = z[i] > m ? z[i] : m;
  long double s = 0, w = 0;
  for (int64_t i = 0; i < v; ++i) {
    if (z[i] == -INFINITY) continue;
    const long double e = expl((long double)z[i] - m);
    s += e;
    w += e * ((long double)z[i] - m);
  }
  return RowRef{m + logl(s), logl(s) - w / s};
}

static sirl_forward_args forward_args(const float* x, int64_t n, int64_t v, int64_t stride, const int64_t* labels,
                                      float temperature, float* lp, float* h, float* stats) {
  sirl_forward_args a{};
  a.in = sirl_rows{x, n, v, stride, labels, 1, temperature, -100, SIRL_FLOAT32};
  a.logprobs = lp;
  a.entropy = h;
  a.stats = stats;
  return a;
}

// coef: alpha, beta, lam, [n] each, one after the other.
static sirl_backward_args backward_args(const sirl_forward_args& f, const float* coef, void* out, int64_t out_stride) {
  sirl_backward_args b{};
  b.in = f.in;
  b.stats = f.stats;
  b.alpha = coef;
  b.beta = coef + f.in.rows;
  b.lam = coef + 2 * f.in.rows;
  b.grad_logits = out;
  b.grad_row_stride = out_stride;
  return b;
}

static void test_rows(const Isa& isa) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  for (int64_t v : {1, 5, 16, 17, 2047, 2048, 2049, 5000, 40003}) {
    const int64_t n = 6, stride = v + 13;
    const float temperature = 0.7f;
    const float inv_t = (float)(1.0 / temperature);
    std::vector<float> x(n * stride, 12345.0f);  // padding between rows must never be read into results
    std::vector<int64_t> labels(n);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t i = 0; i < v; ++i) x[r * stride + i] = (r == 1 && i % 3 == 0 && v > 1) ? -INFINITY : nd(rng);
      labels[r] = (int64_t)(rng() % v);
      if (r == 1 && v > 1 && labels[r] % 3 == 0) labels[r] = (labels[r] + 1) % v;
    }
    labels[4] = -100;
    std::vector<float> lp(n), h(n), stats(2 * n);
    const sirl_forward_args fa = forward_args(x.data(), n, v, stride, labels.data(), temperature,
                                              lp.data(), h.data(), stats.data());
    isa.forward_rows(fa, inv_t, 0, n);
    // The coefficients of g_lp * logprob + g_h * entropy (alpha = -g_lp - g_h H, beta = -g_h, lam = g_lp); row 2
    // with lam = 0 (the label only a column like the others), row 3 arbitrary ones.
    std::vector<float> g_lp(n), g_h(n), coef(3 * n);
    for (int64_t r = 0; r < n; ++r) {
      g_lp[r] = nd(rng), g_h[r] = nd(rng);
      coef[r] = -g_lp[r] - g_h[r] * h[r], coef[n + r] = -g_h[r], coef[2 * n + r] = r == 2 ? 0.0f : g_lp[r];
    }
    coef[3] = nd(rng), coef[n + 3] = nd(rng), coef[2 * n + 3] = nd(rng);
    std::vector<float> grad(n * v);
    isa.backward_rows(backward_args(fa, coef.data(), grad.data(), v), inv_t, 0, n);
    for (int64_t r = 0; r < n; ++r) {
      std::vector<float> z(v);
      for (int64_t i = 0; i < v; ++i) z[i] = x[r * stride + i] * inv_t;
      const RowRef ref = row_reference(z.data(), v);
      const bool valid = labels[r] != -100;
      const long double lse = (long double)stats[2 * r] * inv_t + stats[2 * r + 1];  // the raw max scaled
      if (valid) {
        CHECK(fabsl(lse - ref.lse) <= 1e-5L * (1 + fabsl(ref.lse)), "%s v=%ld r=%ld lse %.9Lg vs %.12Lg", isa.name,
              (long)v, (long)r, lse, ref.lse);
      } else {
        CHECK(stats[2 * r] == 0.0f && stats[2 * r + 1] == 0.0f, "%s ignored row stats must be 0", isa.name);
      }
      const long double want_lp = valid ? (long double)z[labels[r]] - ref.lse : 0;
      const long double want_h = valid ? ref.entropy : 0;
      CHECK(fabsl(lp[r] - want_lp) <= 2e-5L * (1 + fabsl(want_lp)), "%s v=%ld r=%ld lp %.9g vs %.12Lg", isa.name,
            (long)v, (long)r, lp[r], want_lp);
      CHECK(fabsl(h[r] - want_h) <= 2e-5L * (1 + want_h), "%s v=%ld r=%ld h %.9g vs %.12Lg", isa.name, (long)v,
            (long)r, h[r], want_h);
      const long double alpha = coef[r], beta = coef[n + r], lam = coef[2 * n + r];
      long double sum = 0, max_abs = 0;
      for (int64_t i = 0; i < v; ++i) {
        long double want = 0;
        if (valid) {
          const long double logp = (long double)z[i] - ref.lse, p = expl(logp);
          const long double p_term = p == 0 ? 0 : p * (alpha + beta * logp);
          want = (p_term + (i == labels[r] ? lam : 0)) * inv_t;
        }
        max_abs = fmaxl(max_abs, fabsl(want));
        const float got = grad[r * v + i];
        CHECK(!isnan(got), "%s grad NaN", isa.name);
        CHECK(fabsl(got - want) <= 1e-4L * fabsl(want) + 2e-6L * (1 + fabsl(alpha) + fabsl(beta) + fabsl(lam)),
              "%s v=%ld r=%ld i=%ld grad %.9g vs %.12Lg", isa.name, (long)v, (long)r, (long)i, got, want);
        if (z[i] == -INFINITY || !valid) CHECK(got == 0.0f, "%s exact zero gradient expected, got %g", isa.name, got);
        sum += got;
      }
      // A row sums to 0 when the coefficients are an upstream gradient's (sum_i p_i (log p_i + H) = 0).
      if (r != 2 && r != 3) {
        CHECK(fabsl(sum) <= 1e-5L * (1 + max_abs) * (1 + fabsl(g_h[r])), "%s gradient row sum %.3Lg", isa.name, sum);
      }
    }
    // In place: the gradient overwrites the logits (contiguous copy), identical to the out-of-place result.
    std::vector<float> xc(n * v);
    for (int64_t r = 0; r < n; ++r) memcpy(&xc[r * v], &x[r * stride], v * sizeof(float));
    sirl_forward_args fc = fa;
    fc.in.logits = xc.data();
    fc.in.row_stride = v;
    isa.backward_rows(backward_args(fc, coef.data(), xc.data(), v), inv_t, 0, n);
    CHECK(memcmp(xc.data(), grad.data(), n * v * sizeof(float)) == 0, "%s in-place gradient differs", isa.name);
  }
}

// Rows the kernels must not compute normally: a label outside [0, V) (NaN outputs, stats and gradient, and no read
// at that column), a NaN anywhere (NaN outputs and gradient), a common offset of 1e6 (exact).
static void test_special_rows(const Isa& isa) {
  const int64_t v = 3001;
  std::vector<float> x(4 * v);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (auto& e : x) e = nd(rng);
  x[1 * v + 2999] = NAN;  // row 1: NaN in the tail
  x[3 * v + 0] = 2.0f + 1e6f;
  x[3 * v + 1] = -1.0f + 1e6f;
  for (int64_t i = 2; i < v; ++i) x[3 * v + i] = -INFINITY;
  const int64_t labels[4] = {v + 5, 7, -3, 0};
  std::vector<float> lp(4), h(4), stats(8), grad(4 * v);
  const sirl_forward_args fa = forward_args(x.data(), 4, v, v, labels, 1.0f, lp.data(), h.data(), stats.data());
  isa.forward_rows(fa, 1.0f, 0, 4);
  std::vector<float> coef(12, 1.0f);
  isa.backward_rows(backward_args(fa, coef.data(), grad.data(), v), 1.0f, 0, 4);
  for (int64_t r : {0, 1, 2}) {
    CHECK(isnan(lp[r]) && isnan(h[r]), "%s row %ld: lp %g h %g must be NaN", isa.name, (long)r, lp[r], h[r]);
    bool all_nan = true;
    for (int64_t i = 0; i < v; ++i) all_nan &= isnan(grad[r * v + i]) != 0;
    CHECK(all_nan, "%s row %ld: the gradient row must be NaN", isa.name, (long)r);
  }
  CHECK(isnan(stats[0]) && isnan(stats[1]) && isnan(stats[4]), "%s bad-label stats must be NaN", isa.name);
  const long double want = -log1pl(expl(-3.0L));
  CHECK(fabsl(lp[3] - want) <= 1e-7L, "%s offset 1e6: lp %.9g vs %.12Lg", isa.name, lp[3], want);
}

int main() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  using namespace sirl_cpu;
  const Isa isas[] = {
      {"baseline", true, baseline::forward_rows, baseline::backward_rows, baseline::exp_array,
       baseline::convert_array},
      {"avx2", avx2, avx2::forward_rows, avx2::backward_rows, avx2::exp_array, avx2::convert_array},
      {"avx512", avx512, avx512::forward_rows, avx512::backward_rows, avx512::exp_array, avx512::convert_array},
  };
  for (const Isa& isa : isas) {
    if (!isa.supported) {
      printf("  %s: not supported by this CPU, skipped\n", isa.name);
      continue;
    }
    test_exp(isa);
    test_convert(isa);
    test_rows(isa);
    test_special_rows(isa);
  }
  printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
