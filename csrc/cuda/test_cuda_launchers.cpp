// Host-only tests of the CUDA launchers: every argument check fires before any CUDA runtime call, so this
// runs on a machine without a GPU or driver (linked against the static cudart, whose calls are never reached).
// Also checks the split-V plan and row_state.h's vector_state against sirl::update, on the CPU.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "row_state.h"
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

void expect_code(const sirl_cuda::Status& st, sirl_cuda::Code want, const char* what, const char* needle = nullptr) {
  ++g_checks;
  const bool code_ok = st.code == want;
  const bool msg_ok = needle == nullptr || st.message.find(needle) != std::string::npos;
  if (!code_ok || !msg_ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: got %s (%s), want %s%s%s\n", what, sirl_cuda::code_name(st.code),
                 st.message.c_str(), sirl_cuda::code_name(want), needle ? " mentioning " : "", needle ? needle : "");
  }
}

// Host buffers standing in for device pointers: the launchers must reject the call before using them.
alignas(16) float g_logits[64];
alignas(16) int64_t g_labels[8];
alignas(16) float g_out[3][8];
alignas(16) float g_rows[4][8];
alignas(16) float g_grad[64];

sirl_cuda::ForwardParams valid_forward() {
  sirl_cuda::ForwardParams p;
  p.logits = g_logits;
  p.dtype = sirl_cuda::kFloat32;
  p.rows = 4;
  p.vocab = 16;
  p.row_stride = 16;
  p.labels = g_labels;
  p.label_stride = 1;
  p.temperature = 1.0;
  p.logprobs = g_out[0];
  p.entropy = g_out[1];
  p.lse = g_out[2];
  p.num_splits = 1;  // forced: no device query
  return p;
}

sirl_cuda::BackwardParams valid_backward() {
  sirl_cuda::BackwardParams p;
  p.grad_logprobs = g_rows[0];
  p.grad_entropy = g_rows[1];
  p.logits = g_logits;
  p.dtype = sirl_cuda::kFloat32;
  p.rows = 4;
  p.vocab = 16;
  p.row_stride = 16;
  p.labels = g_labels;
  p.label_stride = 1;
  p.lse = g_rows[2];
  p.entropy = g_rows[3];
  p.temperature = 1.0;
  p.grad_logits = g_grad;
  p.grad_row_stride = 16;
  return p;
}

void test_forward_checks() {
  using sirl_cuda::Code;
  using sirl_cuda::logits_forward;
  auto p = valid_forward();
  p.rows = -1;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd negative rows", "rows");
  p = valid_forward();
  p.vocab = -3;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd negative vocab", "vocab");
  p = valid_forward();
  p.dtype = 7;
  expect_code(logits_forward(p, nullptr), Code::kUnsupportedDtype, "fwd dtype 7", "dtype");
  p = valid_forward();
  p.dtype = -1;
  expect_code(logits_forward(p, nullptr), Code::kUnsupportedDtype, "fwd dtype -1", "dtype");

  // N = 0 is a no-op even with null pointers and V = 0, and it makes no CUDA call.
  sirl_cuda::ForwardParams empty;
  empty.rows = 0;
  empty.vocab = 0;
  expect_code(logits_forward(empty, nullptr), Code::kOk, "fwd N=0 no-op");
  empty.vocab = 151936;
  empty.num_splits = 0;  // automatic: must not query the device either
  expect_code(logits_forward(empty, nullptr), Code::kOk, "fwd N=0 auto split no-op");

  p = valid_forward();
  p.vocab = 0;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd V=0", "vocab is 0");
  p = valid_forward();
  p.logits = nullptr;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd null logits", "logits");
  p = valid_forward();
  p.labels = nullptr;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd null labels", "labels");
  for (int k = 0; k < 3; ++k) {
    p = valid_forward();
    (k == 0 ? p.logprobs : k == 1 ? p.entropy : p.lse) = nullptr;
    expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd null output", "output");
  }
  p = valid_forward();
  p.dtype = sirl_cuda::kBFloat16;
  p.logits = reinterpret_cast<const char*>(g_logits) + 1;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd misaligned bf16", "aligned");
  p = valid_forward();
  p.logits = reinterpret_cast<const char*>(g_logits) + 2;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd misaligned fp32", "aligned");
  p = valid_forward();
  p.row_stride = -16;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd negative row stride", "row_stride");
  p = valid_forward();
  p.row_stride = 15;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd overlapping rows", "overlap");
  p = valid_forward();
  p.label_stride = -1;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd negative label stride", "label_stride");
  p = valid_forward();
  p.row_stride = INT64_MAX / 2;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd stride overflow", "overflow");
  for (double t : {0.0, -1.0, static_cast<double>(NAN), static_cast<double>(INFINITY)}) {
    p = valid_forward();
    p.temperature = t;
    expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd bad temperature", "temperature");
  }
  p = valid_forward();
  p.num_splits = -1;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd negative splits", "num_splits");
  p = valid_forward();
  p.num_splits = sirl_cuda::kMaxSplits + 1;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd too many splits", "num_splits");
  p = valid_forward();
  p.num_splits = 2;  // forced split needs a workspace
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd split without workspace", "workspace");
  p.workspace = g_grad;
  p.workspace_bytes = 8;
  expect_code(logits_forward(p, nullptr), Code::kInvalidArgument, "fwd split small workspace", "workspace");
}

void test_backward_checks() {
  using sirl_cuda::Code;
  using sirl_cuda::logits_backward;
  auto p = valid_backward();
  p.rows = -2;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd negative rows", "rows");
  p = valid_backward();
  p.vocab = -1;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd negative vocab", "vocab");
  p = valid_backward();
  p.dtype = 3;
  expect_code(logits_backward(p, nullptr), Code::kUnsupportedDtype, "bwd dtype 3", "dtype");
  sirl_cuda::BackwardParams empty;
  expect_code(logits_backward(empty, nullptr), Code::kOk, "bwd N=0 no-op");
  p = valid_backward();
  p.vocab = 0;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd V=0", "vocab is 0");
  const char* names[] = {"logits", "grad_logits", "labels", "grad_logprobs", "grad_entropy", "lse", "entropy"};
  for (int k = 0; k < 7; ++k) {
    p = valid_backward();
    switch (k) {
      case 0: p.logits = nullptr; break;
      case 1: p.grad_logits = nullptr; break;
      case 2: p.labels = nullptr; break;
      case 3: p.grad_logprobs = nullptr; break;
      case 4: p.grad_entropy = nullptr; break;
      case 5: p.lse = nullptr; break;
      default: p.entropy = nullptr; break;
    }
    expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd null pointer", names[k]);
  }
  p = valid_backward();
  p.dtype = sirl_cuda::kFloat16;
  p.grad_logits = reinterpret_cast<char*>(g_grad) + 1;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd misaligned fp16", "aligned");
  p = valid_backward();
  p.row_stride = -1;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd negative row stride", "row_stride");
  p = valid_backward();
  p.row_stride = 8;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd overlapping input rows", "overlap");
  p = valid_backward();
  p.grad_row_stride = 0;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd broadcast output", "grad_row_stride");
  p = valid_backward();
  p.grad_logits = g_logits;  // in place with a different stride
  p.row_stride = 32;
  p.rows = 2;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd in-place stride mismatch", "in-place");
  p = valid_backward();
  p.label_stride = -4;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd negative label stride", "label_stride");
  p = valid_backward();
  p.grad_row_stride = INT64_MAX / 3;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd stride overflow", "overflow");
  p = valid_backward();
  p.temperature = -0.5;
  expect_code(logits_backward(p, nullptr), Code::kInvalidArgument, "bwd bad temperature", "temperature");
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
      EXPECT(forward_num_splits(3, vocab, 132, n) == n, "plan is idempotent (binding and launcher agree)");
    }
  }
  EXPECT(sirl_cuda::forward_workspace_bytes(10, 1) == 0, "no workspace without split");
  EXPECT(sirl_cuda::forward_workspace_bytes(10, 4) == 10 * 4 * sizeof(sirl::OnlineState), "workspace size");
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
    // Merged into a running state, the entropy agrees as well.
    const float h_seq = sirl::state_entropy(seq);
    const float h_vec = sirl::state_entropy(vec);
    EXPECT(std::fabs(h_seq - h_vec) <= 1e-5f, "vector_state entropy");
  }
  float all_inf[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  const sirl::OnlineState e = sirl_cuda::vector_state<4>(all_inf);
  EXPECT(e.max == -INFINITY && e.sumexp == 0.0f && e.wsum == 0.0f, "all -inf is the empty state");
  float with_nan[4] = {0.0f, NAN, 1.0f, 2.0f};
  EXPECT(std::isnan(sirl_cuda::vector_state<4>(with_nan).sumexp), "NaN propagates");
  const auto r = sirl_cuda::finish_row(sirl_cuda::vector_state<4>(with_nan), 0.0f);
  EXPECT(std::isnan(r.lse), "NaN row");
}

}  // namespace

int main() {
  test_forward_checks();
  test_backward_checks();
  test_split_plan();
  test_vector_state();
  // Nothing above may have reached the device.
  EXPECT(sirl_cuda::cuda_runtime_calls() == 0, "no CUDA runtime call was made");
  std::printf("test_cuda_launchers: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
