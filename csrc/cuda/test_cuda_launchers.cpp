// Host-only tests of libsirl_cuda through its C ABI (the same objects the shared library links): every argument
// check fires before any CUDA runtime call, so this runs on a machine without a GPU or driver (linked against the
// static cudart, whose calls are never reached). Also checks the split-V plan, and row_state.h's vector_state
// against sirl::update (the header) on the CPU, adversarial values included.
#include <cmath>
#include <cstdint>
#include <cstdio>
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
  a.entropy = g_rows[0];
  a.grad_logprobs = g_rows[1];
  a.grad_entropy = g_rows[2];
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
  const char* names[] = {"logits", "grad_logits", "labels", "grad_logprobs", "grad_entropy", "stats", "entropy"};
  for (int k = 0; k < 7; ++k) {
    p = valid_backward();
    switch (k) {
      case 0: p.in.logits = nullptr; break;
      case 1: p.grad_logits = nullptr; break;
      case 2: p.in.labels = nullptr; break;
      case 3: p.grad_logprobs = nullptr; break;
      case 4: p.grad_entropy = nullptr; break;
      case 5: p.stats = nullptr; break;
      default: p.entropy = nullptr; break;
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

// vector_state (the CUDA kernels' vector form) against folding sirl::update (the header), on random and adversarial
// vectors: -inf, +inf, NaN at every position, all -inf, huge values, denormals, offsets of 1e6.
void expect_same_state(const float (&z)[8], const char* what) {
  sirl::OnlineState seq = sirl::empty_state();
  for (float v : z) seq = sirl::update(seq, v);
  const sirl::OnlineState vec = sirl_cuda::vector_state<8>(z);
  // Each state merged into a running state of finite values, then finished, as the kernels do.
  const sirl::OnlineState base = sirl::update(sirl::update(sirl::empty_state(), 0.5f), -1.0f);
  const sirl::RowResult a = sirl::finalize(sirl::merge(base, seq), z[3]);
  const sirl::RowResult b = sirl::finalize(sirl::merge(base, vec), z[3]);
  const auto same = [](float x, float y) {
    if (std::isnan(x) || std::isnan(y)) return std::isnan(x) && std::isnan(y);
    if (std::isinf(x) || std::isinf(y)) return x == y;
    return std::fabs(x - y) <= 1e-5f * (1.0f + std::fabs(y));
  };
  ++g_checks;
  if (!same(a.logprob, b.logprob) || !same(a.entropy, b.entropy) || !same(a.max, b.max) ||
      !same(a.log_sum, b.log_sum)) {
    ++g_failures;
    std::fprintf(stderr, "FAIL vector_state %s: header (%g, %g, %g, %g) vs vector (%g, %g, %g, %g)\n", what,
                 a.logprob, a.entropy, a.max, a.log_sum, b.logprob, b.entropy, b.max, b.log_sum);
  }
}

void test_vector_state() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int trial = 0; trial < 2000; ++trial) {
    float z[8];
    for (float& v : z) v = normal(rng);
    if (trial % 3 == 0) z[trial % 8] = -INFINITY;
    if (trial % 7 == 0) z[(trial + 3) % 8] = -INFINITY;
    sirl::OnlineState seq = sirl::empty_state();
    for (float v : z) seq = sirl::update(seq, v);
    const sirl::OnlineState vec = sirl_cuda::vector_state<8>(z);
    EXPECT(vec.max == seq.max, "vector_state max");
    EXPECT(std::fabs(vec.sumexp - seq.sumexp) <= 1e-5f * seq.sumexp, "vector_state sumexp");
    EXPECT(std::fabs(vec.wsum - seq.wsum) <= 1e-5f * (1.0f + std::fabs(seq.wsum)), "vector_state wsum");
    EXPECT(std::fabs(sirl::state_entropy(seq) - sirl::state_entropy(vec)) <= 1e-5f, "vector_state entropy");
  }
  const float specials[] = {NAN, INFINITY, -INFINITY, 3e38f, -3e38f, 1e-40f, 1e6f, 0.0f};
  for (float special : specials) {
    for (int pos = 0; pos < 8; ++pos) {
      float z[8];
      for (float& v : z) v = normal(rng);
      z[pos] = special;
      expect_same_state(z, "one special value");
      for (float& v : z) v = (v == special) ? v : -INFINITY;  // the special among -inf only
      expect_same_state(z, "special among -inf");
    }
  }
  float offset[8];
  for (int i = 0; i < 8; ++i) offset[i] = 1e6f + static_cast<float>(i % 3);
  expect_same_state(offset, "offset 1e6");
  float all_inf[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  const sirl::OnlineState e = sirl_cuda::vector_state<4>(all_inf);
  EXPECT(e.max == -INFINITY && e.sumexp == 0.0f && e.wsum == 0.0f, "all -inf is the empty state");
  // The holes issue 12 found: a NaN among -inf was the empty state, which the next merge dropped.
  float nan_among_inf[4] = {-INFINITY, NAN, -INFINITY, -INFINITY};
  const sirl::OnlineState merged = sirl::merge(sirl::singleton_state(2.0f), sirl_cuda::vector_state<4>(nan_among_inf));
  EXPECT(std::isnan(sirl::finalize(merged, 2.0f).logprob), "NaN among -inf reaches the row");
  float with_nan[4] = {0.0f, NAN, 1.0f, 2.0f};
  EXPECT(std::isnan(sirl::finalize(sirl_cuda::vector_state<4>(with_nan), 0.0f).log_sum), "NaN row");
}

}  // namespace

int main() {
  test_abi();
  test_forward_checks();
  test_backward_checks();
  test_split_plan();
  test_vector_state();
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
