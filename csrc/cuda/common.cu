// Host-side pieces shared by the launchers: the split-V plan, the CUDA call counter.
#include <algorithm>
#include <atomic>
#include <string>

#include "internal.h"
#include "sirl/online_state.h"
#include "sirl_cuda.h"

namespace sirl_cuda {

namespace {
std::atomic<int64_t> g_cuda_calls{0};

// Split-V tuning: aim for this many resident blocks per SM, never segments shorter than kMinSplitElems
// (a segment is read by one block of 256 threads: 8192 elements is 4 vectors of 8 per thread).
constexpr int64_t kBlocksPerSm = 4;
constexpr int64_t kMinSplitElems = 8192;
constexpr int64_t kDefaultSms = 132;
constexpr int64_t kSplitAlign = 8;  // elements: 16 bytes of a 16-bit dtype
}  // namespace

namespace detail {
void note_cuda_call() { g_cuda_calls.fetch_add(1, std::memory_order_relaxed); }

sirl::Status cuda_status(const char* fn, const char* what, cudaError_t err) {
  if (err == cudaSuccess) return sirl::ok();
  return sirl::device_error(fn, std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}
}  // namespace detail

int64_t cuda_runtime_calls() { return g_cuda_calls.load(std::memory_order_relaxed); }

int64_t forward_split_len(int64_t vocab, int num_splits) {
  if (vocab <= 0) return 0;
  const int64_t s = std::max<int64_t>(1, num_splits);
  int64_t len = (vocab + s - 1) / s;
  len = (len + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  return len;
}

int forward_num_splits(int64_t rows, int64_t vocab, int num_sms, int requested) {
  if (rows <= 0 || vocab <= 0) return 1;
  int64_t s;
  if (requested >= 1) {
    s = requested;
  } else {
    const int64_t sms = num_sms > 0 ? num_sms : kDefaultSms;
    const int64_t target = sms * kBlocksPerSm;
    if (rows >= target) return 1;
    s = (target + rows - 1) / rows;
    s = std::min(s, vocab / kMinSplitElems);
  }
  const int64_t max_by_len = std::max<int64_t>(1, (vocab + kSplitAlign - 1) / kSplitAlign);
  s = std::max<int64_t>(1, std::min<int64_t>({s, int64_t{kMaxSplits}, max_by_len}));
  // Round so that every segment is non-empty.
  const int64_t len = forward_split_len(vocab, static_cast<int>(s));
  return static_cast<int>((vocab + len - 1) / len);
}

size_t forward_workspace_bytes(int64_t rows, int num_splits, bool extras) {
  if (num_splits <= 1 || rows <= 0) return 0;
  const size_t state = extras ? sizeof(sirl::ExtState) : sizeof(sirl::OnlineState);
  return static_cast<size_t>(rows) * static_cast<size_t>(num_splits) * state;
}

}  // namespace sirl_cuda
