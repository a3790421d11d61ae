// Host-only tests of libsirl_cuda through its C ABI (the same objects the shared library links): every argument
// check fires before any CUDA runtime call, so this runs on a machine without a GPU or driver (linked against the
// static cudart, whose calls are never reached). Also checks the split-V plan, and row_state.h's streaming forms
// (raw_update, finish_raw, grad_nonlabel_fast) against the header (sirl::update, sirl::grad_*) on the CPU,
// adversarial values included.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "row_state.h"
#include "sirl/c_api.h"
#include "sirl/online_state.h"
#include "sirl_cuda.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define EXPECT(cond, what)                                                     \
  do {                                                                         \
    ++g_checks;                                                                \
    if (!(cond)) {                                                             \
      ++g_failures;                                                            \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, (what));    \
    }                                                                          \
  } while (0)

// Calls the exported C function and checks its status and sirl_last_error() message.
void expect_code(int32_t code, sirl_status want, const char* what, const char* needle = nullptr) {
  ++g_checks;
  const std::string message = sirl_last_error();
  const bool code_ok = code == want;
  const bool msg_ok = needle == nullptr || message.find(needle) != std::string::npos;
  if (!code_ok || !msg_ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: got status %d (%s), want %d%s%s\n", what, code, message.c_str(), want,
                 needle ? " mentioning " : "", needle ? needle : "");
  }
}

// Host buffers standing in for device pointers: the launchers must reject the call before using them.
alignas(16) float g_logits[64];
alignas(16) int64_t g_labels[8];
alignas(16) float g_out[2][8];
alignas(16) float g_stats[16];
alignas(16) float g_rows[3][8];
alignas(16) float g_grad[64];

// A forced single split: no device query for the split plan.
sirl_launch host_launch() {
  sirl_launch l{};
  l.num_splits = 1;
  return l;
}

sirl_forward_args valid_forward() {
  sirl_forward_args a{};
  a.in = sirl_rows{g_logits, 4, 16, 16, g_labels, 1, 1.0, -100, SIRL_FLOAT32};
  a.logprobs = g_out[0];
  a.entropy = g_out[1];
  a.stats = g_stats;
  return a;
}

sirl_backward_args valid_backward() {
  sirl_backward_args a{};
  a.in = sirl_rows{g_logits, 4, 16, 16, g_labels, 1, 1.0, -100, SIRL_FLOAT32};
  a.stats = g_stats;
  a.alpha = g_rows[0];
  a.beta = g_rows[1];
  a.lam = g_rows[2];
  a.grad_logits = g_grad;
  a.grad_row_stride = 16;
  return a;
}

int32_t forward(const sirl_forward_args& a, const sirl_launch& l = host_launch()) {
  return sirl_logits_forward(&a, &l);
}
int32_t backward(const sirl_backward_args& a) {
  const sirl_launch l = host_launch();
  return sirl_logits_backward(&a, &l);
}

void test_abi() {
  EXPECT(sirl_abi_version() == SIRL_ABI_VERSION, "ABI version");
  EXPECT(std::string(sirl_device_kind()) == "cuda", "device kind");
  EXPECT(sirl_struct_size(SIRL_STRUCT_FORWARD_ARGS) == sizeof(sirl_forward_args), "struct size");
  EXPECT(sirl_struct_size(99) == 0, "unknown struct");
  expect_code(sirl_logits_forward(nullptr, nullptr), SIRL_INVALID_ARGUMENT, "null args", "null");
}

void test_forward_checks() {
  auto p = valid_forward();
  p.in.rows = -1;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd negative rows", "rows");
  p = valid_forward();
  p.in.vocab = -3;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd negative vocab", "vocab");
  p = valid_forward();
  p.in.dtype = 7;
  expect_code(forward(p), SIRL_UNSUPPORTED_DTYPE, "fwd dtype 7", "dtype");
  p = valid_forward();
  p.in.dtype = -1;
  expect_code(forward(p), SIRL_UNSUPPORTED_DTYPE, "fwd dtype -1", "dtype");

  // N = 0 is a no-op even with null pointers and V = 0, and it makes no CUDA call (automatic split included).
  sirl_forward_args empty{};
  expect_code(forward(empty), SIRL_OK, "fwd N=0 no-op");
  empty.in.vocab = 151936;
  sirl_launch automatic{};
  expect_code(forward(empty, automatic), SIRL_OK, "fwd N=0 auto split no-op");
  uint64_t bytes = 7;
  expect_code(sirl_forward_workspace_bytes(&empty, &automatic, &bytes), SIRL_OK, "workspace of N=0");
  EXPECT(bytes == 0, "no workspace for N=0");
  expect_code(sirl_forward_workspace_bytes(&empty, &automatic, nullptr), SIRL_INVALID_ARGUMENT, "null bytes", "bytes");
  const sirl_launch l0 = host_launch();

  p = valid_forward();
  p.in.vocab = 0;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd V=0", "vocab is 0");
  p = valid_forward();
  p.in.logits = nullptr;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd null logits", "logits");
  p = valid_forward();
  p.in.labels = nullptr;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd null labels", "labels");
  for (int k = 0; k < 3; ++k) {
    p = valid_forward();
    (k == 0 ? p.logprobs : k == 1 ? p.entropy : p.stats) = nullptr;
    expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd null output", "output");
  }
  p = valid_forward();
  p.in.dtype = SIRL_BFLOAT16;
  p.in.logits = reinterpret_cast<const char*>(g_logits) + 1;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd misaligned bf16", "aligned");
  p = valid_forward();
  p.in.logits = reinterpret_cast<const char*>(g_logits) + 2;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd misaligned fp32", "aligned");
  p = valid_forward();
  p.in.row_stride = -16;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd negative row stride", "row_stride");
  p = valid_forward();
  p.in.row_stride = 15;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd overlapping rows", "overlap");
  p = valid_forward();
  p.in.label_stride = -1;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd negative label stride", "label_stride");
  p = valid_forward();
  p.in.row_stride = INT64_MAX / 2;
  expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd stride overflow", "overflow");
  for (double t : {0.0, -1.0, static_cast<double>(NAN), static_cast<double>(INFINITY)}) {
    p = valid_forward();
    p.in.temperature = t;
    expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd bad temperature", "temperature");
  }
  // Finite and > 0, but (float)(1 / T) is inf: rejected too (the workspace query says the same).
  for (double t : {1e-39, 1e-300, 4.9e-324}) {
    p = valid_forward();
    p.in.temperature = t;
    expect_code(forward(p), SIRL_INVALID_ARGUMENT, "fwd tiny temperature", "overflows float32");
    expect_code(sirl_forward_workspace_bytes(&p, &l0, &bytes), SIRL_INVALID_ARGUMENT, "workspace tiny temperature",
                "sirl_logits_forward: temperature");
  }
  p = valid_forward();
  p.in.temperature = 3e-38;  // 1/T = 3.3e37: finite in fp32, accepted
  expect_code(sirl_forward_workspace_bytes(&p, &l0, &bytes), SIRL_OK, "workspace small finite 1/T");
  p = valid_forward();
  sirl_launch l = host_launch();
  l.num_splits = -1;
  expect_code(forward(p, l), SIRL_INVALID_ARGUMENT, "fwd negative splits", "num_splits");
  l.num_splits = sirl_cuda::kMaxSplits + 1;
  expect_code(forward(p, l), SIRL_INVALID_ARGUMENT, "fwd too many splits", "num_splits");
  l.num_splits = 2;  // forced split needs a workspace
  expect_code(forward(p, l), SIRL_INVALID_ARGUMENT, "fwd split without workspace", "workspace");
  l.workspace = g_grad;
  l.workspace_bytes = 8;
  expect_code(forward(p, l), SIRL_INVALID_ARGUMENT, "fwd split small workspace", "workspace");
  l.num_splits = 2;
  expect_code(sirl_forward_workspace_bytes(&p, &l, &bytes), SIRL_OK, "workspace of a forced split");
  EXPECT(bytes == sirl_cuda::forward_workspace_bytes(4, 2), "workspace bytes of a forced split");
}

void test_backward_checks() {
  auto p = valid_backward();
  p.in.rows = -2;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd negative rows", "rows");
  p = valid_backward();
  p.in.vocab = -1;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd negative vocab", "vocab");
  p = valid_backward();
  p.in.dtype = 3;
  expect_code(backward(p), SIRL_UNSUPPORTED_DTYPE, "bwd dtype 3", "dtype");
  sirl_backward_args empty{};
  expect_code(backward(empty), SIRL_OK, "bwd N=0 no-op");
  p = valid_backward();
  p.in.vocab = 0;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd V=0", "vocab is 0");
  const char* names[] = {"logits", "grad_logits", "labels", "alpha", "beta", "stats", "lam"};
  for (int k = 0; k < 7; ++k) {
    p = valid_backward();
    switch (k) {
      case 0: p.in.logits = nullptr; break;
      case 1: p.grad_logits = nullptr; break;
      case 2: p.in.labels = nullptr; break;
      case 3: p.alpha = nullptr; break;
      case 4: p.beta = nullptr; break;
      case 5: p.stats = nullptr; break;
      default: p.lam = nullptr; break;
    }
    expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd null pointer", names[k]);
  }
  p = valid_backward();
  p.in.dtype = SIRL_FLOAT16;
  p.grad_logits = reinterpret_cast<char*>(g_grad) + 1;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd misaligned fp16", "aligned");
  p = valid_backward();
  p.in.row_stride = -1;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd negative row stride", "row_stride");
  p = valid_backward();
  p.in.row_stride = 8;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd overlapping input rows", "overlap");
  p = valid_backward();
  p.grad_row_stride = 0;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd broadcast output", "grad_row_stride");
  p = valid_backward();
  p.grad_logits = g_logits;  // in place with a different stride
  p.in.row_stride = 32;
  p.in.rows = 2;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd in-place stride mismatch", "in-place");
  p = valid_backward();
  p.in.label_stride = -4;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd negative label stride", "label_stride");
  p = valid_backward();
  p.grad_row_stride = INT64_MAX / 3;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd stride overflow", "overflow");
  p = valid_backward();
  p.in.temperature = -0.5;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd bad temperature", "temperature");
  p = valid_backward();
  p.in.temperature = 1e-40;
  expect_code(backward(p), SIRL_INVALID_ARGUMENT, "bwd tiny temperature", "overflows float32");
  expect_code(sirl_logits_backward(&p, nullptr), SIRL_INVALID_ARGUMENT, "bwd null launch", "null");
}

void test_split_plan() {
  using sirl_cuda::forward_num_splits;
  using sirl_cuda::forward_split_len;
  EXPECT(forward_num_splits(16384, 151936, 132, 0) == 1, "many rows: no split");
  const int s = forward_num_splits(8, 151936, 132, 0);
  EXPECT(s > 1 && s <= sirl_cuda::kMaxSplits, "few rows: split");
  EXPECT(forward_num_splits(8, 100, 132, 0) == 1, "short rows: no split");
  EXPECT(forward_num_splits(0, 100, 132, 0) == 1, "no rows");
  EXPECT(forward_num_splits(4, 20, 132, 4) == 3, "forced split clamped to non-empty 8-aligned segments");
  EXPECT(forward_num_splits(4, 1, 132, 16) == 1, "V=1 forced split");
  for (int64_t vocab : {1, 7, 8, 9, 100, 1000, 151936, 152064}) {
    for (int req = 1; req <= 300; req += 37) {
      const int n = forward_num_splits(3, vocab, 132, req);
      const int64_t len = forward_split_len(vocab, n);
      EXPECT(n >= 1 && n <= sirl_cuda::kMaxSplits, "split count in range");
      EXPECT(len % 8 == 0, "segment length 8-aligned");
      EXPECT((n - 1) * len < vocab && n * len >= vocab, "segments cover V, none empty");
      // device.cpp plans twice per forward (the workspace query, then the launch): both must agree.
      EXPECT(forward_num_splits(3, vocab, 132, n) == n, "plan is idempotent (workspace query and launch agree)");
    }
  }
  EXPECT(sirl_cuda::forward_workspace_bytes(10, 1) == 0, "no workspace without split");
  EXPECT(sirl_cuda::forward_workspace_bytes(10, 4) == 10 * 4 * sizeof(sirl::OnlineState), "workspace size");
}

// The CUDA kernels' streaming forms (row_state.h) against the header: raw_update over groups of logits, merged
// with raw maxima (merge_scaled) and finished with finish_raw, against folding sirl::update over z = x * inv_t and
// sirl::finalize, on random and adversarial groups (-inf, +inf, NaN at every position, all -inf, NaN among -inf,
// huge values, denormals, offsets of 1e6), at T = 1 and T = 0.7; then the gradients against sirl::grad_*.
template <int kN>
sirl::OnlineState streamed(const float (&x)[kN], float inv_t) {
  return sirl_cuda::raw_to_scaled(sirl_cuda::raw_update<kN>(sirl_cuda::raw_empty(), x, inv_t * sirl_cuda::kLog2e),
                                  inv_t);
}

bool same_value(float x, float y, float tol) {
  if (std::isnan(x) || std::isnan(y)) return std::isnan(x) && std::isnan(y);
  if (std::isinf(x) || std::isinf(y)) return x == y;
  return std::fabs(x - y) <= tol * (1.0f + std::fabs(y));
}

void expect_same_row(const float (&x)[8], float inv_t, const char* what) {
  // the header on z = x * inv_t, merged into a running state of finite values, then finished as the kernels do
  sirl::OnlineState seq = sirl::update(sirl::update(sirl::empty_state(), 0.5f * inv_t), -1.0f * inv_t);
  for (float v : x) seq = sirl::update(seq, v * inv_t);
  const sirl::RowResult a = sirl::finalize(seq, x[3] * inv_t);
  const float base[2] = {0.5f, -1.0f};
  const sirl::OnlineState mine = sirl::merge_scaled(streamed<2>(base, inv_t), streamed<8>(x, inv_t), inv_t);
  const sirl::RowResult b = sirl_cuda::finish_raw(mine, x[3], inv_t);
  // the header rounds z = x * inv_t per element; the raw form does not (ulp(z) apart under huge values, T != 1),
  // and a finite x whose x / T overflows is outside the header's domain (it sees +inf there)
  float top = 0.0f;
  for (float v : x) {
    if (std::isfinite(v) && !std::isfinite(v * inv_t)) return;
    top = std::isfinite(v) ? std::fmax(top, std::fabs(v * inv_t)) : top;
  }
  const float tol = 1e-5f + (inv_t != 1.0f ? 4.0f * (std::nextafter(top, INFINITY) - top) : 0.0f);
  ++g_checks;
  if (!same_value(a.logprob, b.logprob, tol) || !same_value(a.entropy, b.entropy, tol) ||
      !same_value(a.log_sum, b.log_sum, tol) || std::isnan(a.max) != std::isnan(b.max)) {
    ++g_failures;
    std::fprintf(stderr, "FAIL raw_update %s (1/T = %g): header (%g, %g, %g) vs streamed (%g, %g, %g)\n", what,
                 inv_t, a.logprob, a.entropy, a.log_sum, b.logprob, b.entropy, b.log_sum);
  }
}

void test_streamed_state() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (float inv_t : {1.0f, 1.0f / 0.7f}) {
    for (int trial = 0; trial < 2000; ++trial) {
      float x[16];
      for (float& v : x) v = normal(rng);
      if (trial % 3 == 0) x[trial % 16] = -INFINITY;
      if (trial % 7 == 0) x[(trial + 3) % 16] = -INFINITY;
      sirl::OnlineState seq = sirl::empty_state();
      for (float v : x) seq = sirl::update(seq, v * inv_t);
      // two groups of 8 then one of 16: the running rescale and the one-group form agree with the header
      float lo[8], hi[8];
      for (int i = 0; i < 8; ++i) lo[i] = x[i], hi[i] = x[8 + i];
      const float k = inv_t * sirl_cuda::kLog2e;
      const sirl_cuda::RawState two = sirl_cuda::raw_update<8>(sirl_cuda::raw_update<8>(sirl_cuda::raw_empty(), lo, k),
                                                               hi, k);
      for (const sirl::OnlineState got : {sirl_cuda::raw_to_scaled(two, inv_t), streamed<16>(x, inv_t)}) {
        EXPECT(got.max * inv_t == seq.max || std::fabs(got.max * inv_t - seq.max) <= 1e-6f * std::fabs(seq.max),
               "streamed max");
        EXPECT(std::fabs(got.sumexp - seq.sumexp) <= 1e-5f * seq.sumexp, "streamed sumexp");
        EXPECT(std::fabs(got.wsum - seq.wsum) <= 1e-5f * (1.0f + std::fabs(seq.wsum)), "streamed wsum");
        // the same 1e-5 as the header's own tests: the streamed form differs from the header only in where x / T
        // is rounded (once per difference x - max instead of once per element); ~4e-7 over these trials
        EXPECT(std::fabs(sirl::state_entropy(seq) - sirl::state_entropy(got)) <= 1e-5f, "streamed entropy");
      }
    }
    const float specials[] = {NAN, INFINITY, -INFINITY, 3e38f, -3e38f, 1e-40f, 1e6f, 0.0f};
    for (float special : specials) {
      for (int pos = 0; pos < 8; ++pos) {
        float x[8];
        for (float& v : x) v = normal(rng);
        x[pos] = special;
        expect_same_row(x, inv_t, "one special value");
        for (float& v : x) v = (v == special) ? v : -INFINITY;  // the special among -inf only
        expect_same_row(x, inv_t, "special among -inf");
      }
    }
    float offset[8];
    for (int i = 0; i < 8; ++i) offset[i] = 1e6f + static_cast<float>(i % 3);
    expect_same_row(offset, inv_t, "offset 1e6");
  }
  float all_inf[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  const sirl::OnlineState e = streamed<4>(all_inf, 1.0f);
  EXPECT(e.max == -INFINITY && e.sumexp == 0.0f && e.wsum == 0.0f, "all -inf is the empty state");
  // The hole issue 12 found: a NaN among -inf was the empty state, which the next merge dropped.
  float nan_among_inf[4] = {-INFINITY, NAN, -INFINITY, -INFINITY};
  const sirl::OnlineState merged = sirl::merge_scaled(sirl::singleton_state(2.0f), streamed<4>(nan_among_inf, 1.0f), 1.0f);
  EXPECT(std::isnan(sirl_cuda::finish_raw(merged, 2.0f, 1.0f).logprob), "NaN among -inf reaches the row");
  float with_nan[4] = {0.0f, NAN, 1.0f, 2.0f};
  EXPECT(std::isnan(sirl_cuda::finish_raw(streamed<4>(with_nan, 1.0f), 0.0f, 1.0f).log_sum), "NaN row");
  // offsets of 1e6 at T = 0.7: the difference before the scaling keeps logprob exact (the header's z loses it)
  float off[4] = {1e6f + 2.0f, 1e6f - 1.0f, 1e6f - 1.0f, 1e6f - 1.0f};
  const sirl::RowResult r = sirl_cuda::finish_raw(streamed<4>(off, 1.0f / 0.7f), off[0], 1.0f / 0.7f);
  const double z0 = 3.0 / 0.7, want = -std::log(1.0 + 3.0 * std::exp(-z0));
  EXPECT(std::fabs(r.logprob - want) <= 1e-6, "offset 1e6, T = 0.7: exact logprob");
}

void test_streamed_gradients() {
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  // 1/T = 2^126 and 2^-126 are the API's ends (upstream gradients in [-1, 1] there, so the gradient fits fp32):
  // every gradient finite and equal to the header's (which multiplies by 1/T last), exactly 0 where p is 0 (at
  // 1/T = 2^126 every logit but the row's max); FLT_MIN more for results the GPU may flush. A constant
  // c1 = beta / T overflowed there, and p = 0 times inf was NaN. The coefficients are those of
  // g_lp * logprob + g_h * entropy (alpha = -g_lp - g_h H, beta = -g_h, lam = g_lp), with lam = 0 every third trial.
  for (float inv_t : {1.0f, 1.0f / 0.7f, 2.0f, std::ldexp(1.0f, 126), std::ldexp(1.0f, -126)}) {
    const bool extreme = inv_t > 4.0f || inv_t < 0.25f;
    for (int trial = 0; trial < 500; ++trial) {
      float x[32];
      for (float& v : x) v = normal(rng);
      x[trial % 32] = (trial % 5 == 0) ? -INFINITY : x[trial % 32];
      const float k = inv_t * sirl_cuda::kLog2e;
      sirl_cuda::RawState st = sirl_cuda::raw_empty();
      for (int g = 0; g < 32; g += 8) {
        float grp[8];
        for (int i = 0; i < 8; ++i) grp[i] = x[g + i];
        st = sirl_cuda::raw_update<8>(st, grp, k);
      }
      const sirl::RowResult row = sirl_cuda::finish_raw(sirl_cuda::raw_to_scaled(st, inv_t), x[0], inv_t);
      const float g_lp = extreme ? unit(rng) : normal(rng), g_h = extreme ? unit(rng) : normal(rng);
      const float alpha = -g_lp - g_h * row.entropy, beta = -g_h, lam = trial % 3 == 0 ? 0.0f : g_lp;
      const sirl_cuda::GradRow fast = sirl_cuda::grad_row(row.max, row.log_sum, alpha, beta, inv_t);
      const float tol = 2e-5f * (std::fabs(alpha) + std::fabs(beta) + 1.0f) * inv_t + FLT_MIN;
      for (int i = 0; i < 32; ++i) {
        const float logp = (x[i] - row.max) * inv_t - row.log_sum;
        const float want = sirl::grad_nonlabel(logp, alpha, beta, inv_t);
        const float got = sirl_cuda::grad_nonlabel_fast(x[i], fast);
        EXPECT(std::isfinite(got) && std::fabs(got - want) <= tol, "grad_nonlabel_fast");
        if (x[i] == -INFINITY || (want == 0.0f && inv_t > 1.0f)) EXPECT(got == 0.0f, "p = 0: gradient exactly 0");
      }
      const float want = sirl::grad_label((x[0] - row.max) * inv_t - row.log_sum, alpha, beta, lam, inv_t);
      EXPECT(same_value(sirl_cuda::grad_label_raw(x[0], fast, row.log_sum, alpha, beta, lam), want, 1e-6f),
             "grad_label_raw");
    }
  }
  // NaN stats (a NaN row) give NaN gradients, even for a -inf logit
  const sirl_cuda::GradRow nan_row = sirl_cuda::grad_row(1.0f, NAN, 1.0f, 1.0f, 1.0f);
  EXPECT(std::isnan(sirl_cuda::grad_nonlabel_fast(0.5f, nan_row)), "NaN row: NaN gradient");
  EXPECT(std::isnan(sirl_cuda::grad_nonlabel_fast(-INFINITY, nan_row)), "NaN row: NaN gradient at -inf");
}

// The specialised forms (RawExtState, grad_nonlabel_terms) against the header's ExtState and grad_* with gamma,
// delta: groups of 8 with running rescales (and their merge with raw maxima) vs sirl::update over z = x * inv_t.
// Tolerances: ex2 vs exp2f on the host is exact here; the rest is fp32 rounding of sums over 32 logits
// (~32 eps relative to sum |d| for dsum, to E[d^2] + E[d]^2 for the varentropy's cancellation): 2e-5 of scale.
void test_streamed_extras() {
  std::mt19937 rng(4321);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (float inv_t : {1.0f, 1.0f / 0.7f, 2.0f}) {
    const float k = inv_t * sirl_cuda::kLog2e;
    for (int trial = 0; trial < 1000; ++trial) {
      float x[32];
      for (float& v : x) v = normal(rng);
      if (trial % 4 == 1) x[trial % 32] = -INFINITY;
      if (trial % 9 == 0) for (int i = 0; i < 8; ++i) x[i] = -INFINITY;  // a whole -inf group first
      sirl::ExtState seq = sirl::ext_empty_state();
      for (float v : x) seq = sirl::update(seq, v * inv_t);
      // groups 0, 1 in one thread's state; groups 2, 3 in another's; merged with raw maxima
      sirl_cuda::RawExtState a = sirl_cuda::raw_ext_empty(), b = sirl_cuda::raw_ext_empty();
      for (int g = 0; g < 32; g += 8) {
        float grp[8];
        for (int i = 0; i < 8; ++i) grp[i] = x[g + i];
        if (g < 16) a = sirl_cuda::raw_update<8>(a, grp, k);
        else b = sirl_cuda::raw_update<8>(b, grp, k);
      }
      const sirl::ExtState got =
          sirl::merge_scaled(sirl_cuda::raw_to_scaled(a, inv_t), sirl_cuda::raw_to_scaled(b, inv_t), inv_t);
      const sirl::ExtraResult want = sirl::finalize_extras(seq.s, seq.x);
      const sirl::ExtraResult r = sirl::finalize_extras(got.s, got.x);
      EXPECT(got.x.count == 32.0f, "streamed extras count");
      EXPECT(same_value(r.self_certainty, want.self_certainty, 2e-5f), "streamed self-certainty");
      EXPECT(same_value(r.varentropy, want.varentropy, 2e-5f * (1.0f + want.varentropy)), "streamed varentropy");
      // the plain part is the plain form's
      const sirl::OnlineState plain = sirl::merge_scaled(sirl_cuda::raw_to_scaled(a.base, inv_t),
                                                         sirl_cuda::raw_to_scaled(b.base, inv_t), inv_t);
      EXPECT(std::memcmp(&plain, &got.s, sizeof(plain)) == 0, "extras leave the plain sums bit for bit");
      // the backward's terms
      const sirl::RowResult row = sirl_cuda::finish_raw(got.s, x[31], inv_t);
      const float alpha = normal(rng), beta = normal(rng), gamma = normal(rng), delta = normal(rng), lam = normal(rng);
      const sirl_cuda::GradRow fast = sirl_cuda::grad_row(row.max, row.log_sum, alpha, beta, inv_t);
      const sirl_cuda::GradTerms terms{row.log_sum, alpha, beta, gamma, delta * inv_t};
      for (int i = 0; i < 32; ++i) {
        const float logp = (x[i] - row.max) * inv_t - row.log_sum;
        const float w = sirl::grad_nonlabel(logp, alpha, beta, gamma, delta, inv_t);
        const float g = sirl_cuda::grad_nonlabel_terms(x[i], fast, terms);
        const float tol = 2e-5f * (std::fabs(alpha) + std::fabs(beta) + std::fabs(gamma) * 4.0f + std::fabs(delta) + 1.0f) * inv_t;
        EXPECT(std::isfinite(g) && std::fabs(g - w) <= tol, "grad_nonlabel_terms");
        if (x[i] == -INFINITY) EXPECT(g == delta * inv_t, "p = 0: exactly delta / T");
      }
      const float wl = sirl::grad_label((x[31] - row.max) * inv_t - row.log_sum, alpha, beta, lam, gamma, delta, inv_t);
      EXPECT(same_value(sirl_cuda::grad_label_raw(x[31], fast, row.log_sum, alpha, beta, lam, gamma, delta), wl, 1e-6f),
             "grad_label_raw with terms");
    }
  }
  // NaN and +inf: NaN extras; all -inf: NaN extras
  for (float bad : {NAN, INFINITY}) {
    float x[8] = {0.0f, 1.0f, -INFINITY, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f};
    x[5] = bad;
    const sirl::ExtState st = sirl_cuda::raw_to_scaled(sirl_cuda::raw_update<8>(sirl_cuda::raw_ext_empty(), x, 1.0f), 1.0f);
    const sirl::ExtraResult r = sirl::finalize_extras(st.s, st.x);
    EXPECT(std::isnan(r.self_certainty) && std::isnan(r.varentropy), "NaN / +inf: NaN extras");
  }
  float all_inf[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  const sirl::ExtState e = sirl_cuda::raw_to_scaled(sirl_cuda::raw_update<4>(sirl_cuda::raw_ext_empty(), all_inf, 1.0f), 1.0f);
  const sirl::ExtraResult re = sirl::finalize_extras(e.s, e.x);
  EXPECT(e.x.dsum == -INFINITY && std::isnan(re.self_certainty) && std::isnan(re.varentropy), "all -inf: NaN extras");
}

}  // namespace

int main() {
  test_abi();
  test_forward_checks();
  test_backward_checks();
  test_split_plan();
  test_streamed_state();
  test_streamed_gradients();
  test_streamed_extras();
  // Nothing above may have reached the device.
  EXPECT(sirl_cuda::cuda_runtime_calls() == 0, "no CUDA runtime call was made");
  // The probe does reach the runtime: where this runs without a driver or GPU it must say so, in words.
  sirl_launch device0{};
  const int32_t probe = sirl_probe(&device0);
  const std::string why = sirl_last_error();
  std::printf("test_cuda_launchers: probe of device 0: %s\n", probe == SIRL_OK ? "ok" : why.c_str());
  EXPECT(probe == SIRL_OK || (probe == SIRL_DEVICE_ERROR && !why.empty()) ||
             (probe == SIRL_INVALID_ARGUMENT && why.find("does not exist") != std::string::npos),
         "the probe answers ok or a reason");
  std::printf("test_cuda_launchers: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
