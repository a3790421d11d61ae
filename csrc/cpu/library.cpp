// libsirl_cpu: the device hooks of the C ABI (sirl/c_api.h) for CPU memory, run-time ISA dispatch, rows split over
// threads, and the CPU-only exports (ISA control, huge-page advice, test hooks).
//
// Threads: each call splits its rows into at most launch.num_threads contiguous ranges (Python passes
// torch.get_num_threads()), one std::thread per extra range, joined before returning. Plain threads and no OpenMP
// so the library brings no second OpenMP runtime beside torch's, and owns no pool that a fork() could strand. A
// range is at least kMinElementsPerThread elements, so small calls run on the calling thread. Every row is
// reduced by one thread in a fixed order, so results never depend on the thread count.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels.h"
#include "sirl/c_api.h"
#include "sirl/host_api.h"

namespace sirl_cpu {
namespace {

struct Kernels {
  const char* name;
  decltype(&baseline::forward_rows) forward_rows;
  decltype(&baseline::backward_rows) backward_rows;
  decltype(&baseline::exp_array) exp_array;
  decltype(&baseline::convert_array) convert_array;
  decltype(&baseline::fixed_order_panel_cols) fixed_order_panel_cols;
  decltype(&baseline::fixed_order_work_floats) fixed_order_work_floats;
  decltype(&baseline::fixed_order_logits) fixed_order_logits;
};

#define SIRL_CPU_KERNELS_OF(isa)                                                                              \
  isa::forward_rows, isa::backward_rows, isa::exp_array, isa::convert_array, isa::fixed_order_panel_cols,       \
      isa::fixed_order_work_floats, isa::fixed_order_logits
const Kernels kAvx512{"avx512", SIRL_CPU_KERNELS_OF(avx512)};
const Kernels kAvx2{"avx2", SIRL_CPU_KERNELS_OF(avx2)};
const Kernels kBaseline{"baseline", SIRL_CPU_KERNELS_OF(baseline)};
#undef SIRL_CPU_KERNELS_OF

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}

// The best build this CPU runs, capped by `request` ("avx512" | "avx2" | "baseline" | "" or "auto" for no cap);
// nullptr for an unknown name.
const Kernels* pick(const std::string& request) {
  if (request == "baseline") return &kBaseline;
  if (!request.empty() && request != "auto" && request != "avx2" && request != "avx512") return nullptr;
  if (request != "avx2" && cpu_has_avx512()) return &kAvx512;
  if (cpu_has_avx2()) return &kAvx2;
  return &kBaseline;
}

std::atomic<const Kernels*>& active() {
  static std::atomic<const Kernels*> k{[] {
    const char* env = std::getenv("SIRL_KERNELS_CPU_ISA");
    const Kernels* chosen = pick(env ? std::string(env) : std::string());
    return chosen ? chosen : pick(std::string());  // an unknown value caps nothing (Python reports it)
  }()};
  return k;
}

// At least this many elements per thread: below it, starting a thread (tens of microseconds) costs more than it
// saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 18;

// Runs body(r0, r1) over [0, rows) in contiguous ranges, one per thread.
template <typename Body>
void parallel_rows(int64_t rows, int64_t vocab, int32_t num_threads, const Body& body) {
  const int64_t min_rows = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(vocab, 1));
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, (rows + min_rows - 1) / min_rows));
  if (threads == 1) {
    body(int64_t{0}, rows);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  auto range_start = [&](int64_t t) { return rows * t / threads; };
  for (int64_t t = 1; t < threads; ++t) {
    try {
      workers.emplace_back(body, range_start(t), range_start(t + 1));
    } catch (const std::system_error&) {  // no thread to be had: this range runs here instead
      body(range_start(t), range_start(t + 1));
    }
  }
  body(int64_t{0}, range_start(1));
  for (std::thread& w : workers) w.join();
}

// The active build's row kernel over all rows (arguments checked, rows > 0), split over the launch's threads.
template <typename Args, typename RowKernel>
sirl::Status run_rows(const Args& args, const sirl_launch& launch, RowKernel Kernels::*row_kernel) {
  const RowKernel kernel = active().load()->*row_kernel;
  const float inv_t = sirl::inv_temperature(args.in);
  parallel_rows(args.in.rows, args.in.vocab, launch.num_threads,
                [&](int64_t r0, int64_t r1) { kernel(args, inv_t, r0, r1); });
  return sirl::ok();
}

// sirl_cpu_fixed_order_logits with checked arguments, rows, vocab and dim > 0. The work is split into a grid of
// (vocabulary panels) x (row ranges), one cell per thread; never over dim, so each output is one thread's fixed
// chain of FMAs (fixed_order_logits.inc) and the result does not depend on the thread count or the split.
void fixed_order_run(const FixedOrderArgs& a, int32_t num_threads) {
  const Kernels* k = active().load();
  const int64_t panel = k->fixed_order_panel_cols(a.dim);
  const int64_t panels = (a.vocab + panel - 1) / panel;
  // At least about 2^22 multiply-adds per thread (a millisecond): below it a thread costs more than it saves.
  const double work = (double)a.rows * (double)a.vocab * (double)a.dim;
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(num_threads, (int64_t)std::min(work / 4194304.0, 1e9)));
  const int64_t tp = std::min(threads, panels);
  const int64_t tr = std::max<int64_t>(1, std::min<int64_t>(threads / tp, a.rows));
  const size_t work_bytes = ((size_t)k->fixed_order_work_floats(a.dim) * 4 + 63) / 64 * 64;
  auto cell = [&a, k, panel, panels, tp, tr, work_bytes](int64_t t) {
    const int64_t pi = t % tp, ri = t / tp;
    const int64_t v0 = std::min(a.vocab, panels * pi / tp * panel);
    const int64_t v1 = std::min(a.vocab, panels * (pi + 1) / tp * panel);
    const int64_t r0 = a.rows * ri / tr, r1 = a.rows * (ri + 1) / tr;
    if (v0 >= v1 || r0 >= r1) return;
    float* buf = static_cast<float*>(std::aligned_alloc(64, work_bytes));
    if (buf == nullptr) throw std::bad_alloc();
    k->fixed_order_logits(a, v0, v1, r0, r1, buf);
    std::free(buf);
  };
  const int64_t cells = tp * tr;
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(cells));
  workers.reserve(static_cast<size_t>(cells - 1));
  auto guarded = [&cell, &errors](int64_t t) {
    try {
      cell(t);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  for (int64_t t = 1; t < cells; ++t) {
    try {
      workers.emplace_back(guarded, t);
    } catch (const std::system_error&) {  // no thread to be had: this cell runs here instead
      guarded(t);
    }
  }
  guarded(0);
  for (std::thread& w : workers) w.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

sirl::Status isa_invalid(const char* fn, const char* name) {
  return sirl::invalid(fn, std::string("unknown CPU ISA '") + (name ? name : "(null)") +
                               "'; expected 'avx512', 'avx2', 'baseline' or 'auto'");
}

}  // namespace
}  // namespace sirl_cpu

namespace sirl {
namespace device {

const char* const kKind = "cpu";

Status probe(const sirl_launch&) { return ok(); }

Status forward_workspace_bytes(const char*, const sirl_forward_args&, const sirl_launch&, uint64_t*) {
  return ok();  // no workspace
}

Status logits_forward(const char*, const sirl_forward_args& args, const sirl_launch& launch) {
  return sirl_cpu::run_rows(args, launch, &sirl_cpu::Kernels::forward_rows);
}

Status logits_backward(const char*, const sirl_backward_args& args, const sirl_launch& launch) {
  return sirl_cpu::run_rows(args, launch, &sirl_cpu::Kernels::backward_rows);
}

}  // namespace device
}  // namespace sirl

extern "C" {

SIRL_API const char* sirl_cpu_isa(void) { return sirl_cpu::active().load()->name; }

SIRL_API int32_t sirl_cpu_set_isa(const char* name, const char** chosen) {
  const char* fn = "sirl_cpu_set_isa";
  return sirl::run_exported(fn, [&] {
    const sirl_cpu::Kernels* k = name ? sirl_cpu::pick(name) : nullptr;
    if (k == nullptr) return sirl_cpu::isa_invalid(fn, name);
    sirl_cpu::active().store(k);
    if (chosen) *chosen = k->name;
    return sirl::ok();
  });
}

SIRL_API int32_t sirl_cpu_advise_hugepages(void* data, uint64_t bytes) {
  // Large buffers only; the interior aligned to 2 MiB (madvise needs page-aligned ranges). A kernel without
  // transparent huge pages, or with them off, refuses: harmless, so not an error.
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (data != nullptr && bytes >= 4 * kHuge) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(data);
    const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = (b + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
  return SIRL_OK;
}

SIRL_API int32_t sirl_cpu_exp(const float* x, float* y, int64_t n, int32_t variant) {
  const char* fn = "sirl_cpu_exp";
  return sirl::run_exported(fn, [&] {
    if (n < 0 || (n > 0 && (!x || !y)) || variant < 0 || variant > 2) {
      return sirl::invalid(fn, "needs n >= 0, buffers, and variant 0, 1 or 2");
    }
    sirl_cpu::active().load()->exp_array(x, y, n, variant);
    return sirl::ok();
  });
}

SIRL_API int32_t sirl_cpu_convert(const void* src, int32_t src_dtype, void* dst, int32_t dst_dtype, int64_t n) {
  const char* fn = "sirl_cpu_convert";
  return sirl::run_exported(fn, [&] {
    if (!sirl::dtype_supported(src_dtype) || !sirl::dtype_supported(dst_dtype)) {
      return sirl::Status{SIRL_UNSUPPORTED_DTYPE, std::string(fn) + ": dtype codes " + std::to_string(src_dtype) +
                                                      " -> " + std::to_string(dst_dtype)};
    }
    if (n < 0 || (n > 0 && (!src || !dst))) return sirl::invalid(fn, "needs n >= 0 and buffers");
    sirl_cpu::active().load()->convert_array(src_dtype, src, dst_dtype, dst, n);
    return sirl::ok();
  });
}

SIRL_API int32_t sirl_cpu_fixed_order_logits(const void* hidden, int32_t dtype, int64_t rows, int64_t dim,
                                             int64_t stride_hidden, const void* weight, int64_t vocab,
                                             int64_t stride_weight, float* out, int64_t stride_out,
                                             int32_t num_threads) {
  const char* fn = "sirl_cpu_fixed_order_logits";
  return sirl::run_exported(fn, [&] {
    if (!sirl::dtype_supported(dtype)) {
      return sirl::Status{SIRL_UNSUPPORTED_DTYPE, std::string(fn) + ": dtype code " + std::to_string(dtype) +
                                                      " is not supported (float32 = 0, bfloat16 = 1, float16 = 2)"};
    }
    if (rows < 0 || dim < 0 || vocab < 0) return sirl::invalid(fn, "needs rows, dim and vocab >= 0");
    if (stride_hidden < 0 || stride_weight < 0) return sirl::invalid(fn, "needs row strides >= 0");
    if (rows > 1 && stride_out < vocab) {
      return sirl::invalid(fn, "out rows overlap: stride_out " + std::to_string(stride_out) + " < vocab " +
                                   std::to_string(vocab));
    }
    if (rows == 0 || vocab == 0) return sirl::ok();
    if (out == nullptr || (dim > 0 && (hidden == nullptr || weight == nullptr))) {
      return sirl::invalid(fn, "hidden, weight or out is a null pointer");
    }
    if (dim == 0) {  // an empty sum: +0
      for (int64_t n = 0; n < rows; ++n) std::fill(out + n * stride_out, out + n * stride_out + vocab, 0.0f);
      return sirl::ok();
    }
    const sirl_cpu::FixedOrderArgs a{hidden, weight, out, rows, dim, vocab, stride_hidden, stride_weight,
                                     stride_out, dtype};
    sirl_cpu::fixed_order_run(a, num_threads);
    return sirl::ok();
  });
}

}  // extern "C"
