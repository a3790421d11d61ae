// Host-side C++ shared by libsirl_cpu and libsirl_cuda (torch-free, no device code): the status type, the argument
// checks both devices run before touching memory, and the four per-device hooks that csrc/common/c_api.cpp
// exports as the C ABI of c_api.h. Each library defines the hooks once (csrc/cpu/library.cpp,
// csrc/cuda/device.cpp); everything else about the ABI is written here and in c_api.cpp, once.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>
#include <string>

#include "sirl/c_api.h"
#include "sirl/online_state.h"

namespace sirl {

struct Status {
  sirl_status code = SIRL_OK;
  std::string message;
  bool ok() const { return code == SIRL_OK; }
};

inline Status ok() { return Status{}; }

inline Status invalid(const char* fn, const std::string& what) {
  return Status{SIRL_INVALID_ARGUMENT, std::string(fn) + ": " + what};
}

inline Status device_error(const char* fn, const std::string& what) {
  return Status{SIRL_DEVICE_ERROR, std::string(fn) + ": " + what};
}

inline bool dtype_supported(int32_t dtype) {
  return dtype == SIRL_FLOAT32 || dtype == SIRL_BFLOAT16 || dtype == SIRL_FLOAT16;
}

inline size_t dtype_size(int32_t dtype) { return dtype == SIRL_FLOAT32 ? 4 : dtype_supported(dtype) ? 2 : 0; }

inline const char* dtype_name(int32_t dtype) {
  switch (dtype) {
    case SIRL_FLOAT32:
      return "float32";
    case SIRL_BFLOAT16:
      return "bfloat16";
    case SIRL_FLOAT16:
      return "float16";
    default:
      return "unknown";
  }
}

// (rows - 1) * stride + extent must fit in int64 (all kernel offsets are int64).
inline bool extent_fits(int64_t rows, int64_t stride, int64_t extent) {
  if (rows <= 1 || stride == 0) return true;
  return rows - 1 <= (std::numeric_limits<int64_t>::max() - extent) / stride;
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 1/T as every kernel multiplies by it: the division in double, then rounded to fp32 once (the "torch" backend's
// rounding). check_rows rejects a temperature whose fp32 1/T would not be finite.
inline float inv_temperature(const sirl_rows& in) { return static_cast<float>(1.0 / in.temperature); }

// The inputs both directions read. rows == 0 passes with any pointers (empty tensors may have none): the exported
// functions return early on it after the checks (run_checked), so no hook ever sees it.
inline Status check_rows(const sirl_rows& in, const char* fn) {
  if (in.rows < 0) return invalid(fn, "rows must be >= 0, got " + std::to_string(in.rows));
  if (in.vocab < 0) return invalid(fn, "vocab must be >= 0, got " + std::to_string(in.vocab));
  if (!dtype_supported(in.dtype)) {
    return Status{SIRL_UNSUPPORTED_DTYPE, std::string(fn) + ": dtype code " + std::to_string(in.dtype) +
                                              " is not supported (float32 = 0, bfloat16 = 1, float16 = 2)"};
  }
  if (in.rows == 0) return ok();
  if (in.vocab == 0) return invalid(fn, "vocab is 0 (empty vocabulary) with " + std::to_string(in.rows) + " rows");
  if (in.logits == nullptr) return invalid(fn, "logits is a null pointer");
  if (in.labels == nullptr) return invalid(fn, "labels is a null pointer");
  if (!aligned_to(in.logits, dtype_size(in.dtype))) {
    return invalid(fn, std::string("logits pointer is not aligned to its ") + dtype_name(in.dtype) + " elements");
  }
  if (!aligned_to(in.labels, sizeof(int64_t))) return invalid(fn, "labels pointer is not 8-byte aligned");
  if (in.row_stride < 0) return invalid(fn, "row_stride must be >= 0, got " + std::to_string(in.row_stride));
  if (in.rows > 1 && in.row_stride != 0 && in.row_stride < in.vocab) {
    return invalid(fn, "row_stride " + std::to_string(in.row_stride) + " is smaller than vocab " +
                           std::to_string(in.vocab) + " (rows would overlap)");
  }
  if (in.label_stride < 0) return invalid(fn, "label_stride must be >= 0, got " + std::to_string(in.label_stride));
  if (!extent_fits(in.rows, in.row_stride, in.vocab) || !extent_fits(in.rows, in.label_stride, 1)) {
    return invalid(fn, "rows x stride overflows int64");
  }
  if (!(std::isfinite(in.temperature) && in.temperature > 0.0)) {
    return invalid(fn, "temperature must be finite and > 0, got " + std::to_string(in.temperature));
  }
  if (!std::isfinite(inv_temperature(in))) {
    char t[32];
    std::snprintf(t, sizeof(t), "%.9g", in.temperature);
    return invalid(fn, std::string("temperature ") + t + " is too small: 1 / temperature overflows float32");
  }
  return ok();
}

inline Status check_forward(const sirl_forward_args& a, const char* fn) {
  Status st = check_rows(a.in, fn);
  if (!st.ok() || a.in.rows == 0) return st;
  if (a.logprobs == nullptr || a.entropy == nullptr || a.stats == nullptr) {
    return invalid(fn, "an output pointer (logprobs, entropy or stats) is null");
  }
  if (!aligned_to(a.logprobs, 4) || !aligned_to(a.entropy, 4) || !aligned_to(a.stats, 4)) {
    return invalid(fn, "an output pointer is not 4-byte aligned");
  }
  if (!aligned_to(a.self_certainty, 4) || !aligned_to(a.varentropy, 4)) {
    return invalid(fn, "self_certainty or varentropy is not 4-byte aligned");
  }
  return ok();
}

inline Status check_backward(const sirl_backward_args& a, const char* fn) {
  Status st = check_rows(a.in, fn);
  if (!st.ok() || a.in.rows == 0) return st;
  if (a.grad_logits == nullptr) return invalid(fn, "grad_logits is a null pointer");
  if (a.alpha == nullptr || a.beta == nullptr || a.lam == nullptr) {
    return invalid(fn, "alpha, beta or lam is a null pointer");
  }
  if (a.stats == nullptr) return invalid(fn, "stats is a null pointer");
  if (!aligned_to(a.grad_logits, dtype_size(a.in.dtype))) {
    return invalid(fn, std::string("grad_logits is not aligned to its ") + dtype_name(a.in.dtype) + " elements");
  }
  if (!aligned_to(a.alpha, 4) || !aligned_to(a.beta, 4) || !aligned_to(a.lam, 4) || !aligned_to(a.stats, 4)) {
    return invalid(fn, "a per-row fp32 pointer is not 4-byte aligned");
  }
  if (!aligned_to(a.gamma, 4) || !aligned_to(a.delta, 4)) return invalid(fn, "gamma or delta is not 4-byte aligned");
  if (a.grad_row_stride < 0 || (a.in.rows > 1 && a.grad_row_stride < a.in.vocab)) {
    return invalid(fn, "grad_row_stride " + std::to_string(a.grad_row_stride) + " must be >= vocab " +
                           std::to_string(a.in.vocab) + " (the gradient rows must not overlap)");
  }
  if (a.grad_logits == a.in.logits && a.grad_row_stride != a.in.row_stride) {
    return invalid(fn, "in-place backward (grad_logits == logits) needs grad_row_stride == row_stride, got " +
                           std::to_string(a.grad_row_stride) + " and " + std::to_string(a.in.row_stride));
  }
  if (!extent_fits(a.in.rows, a.grad_row_stride, a.in.vocab)) return invalid(fn, "rows x stride overflows int64");
  return ok();
}

// Whether a call asks for the optional outputs / terms (the specialised kernels).
inline bool wants_extras(const sirl_forward_args& a) { return a.self_certainty != nullptr || a.varentropy != nullptr; }
inline bool has_extra_terms(const sirl_backward_args& a) { return a.gamma != nullptr || a.delta != nullptr; }

// The label of row r as a column index, or kIgnoredRow / kBadLabelRow (online_state.h's label_column).
inline int64_t label_column(const sirl_rows& in, int64_t r) {
  return label_column(in.labels[r * in.label_stride], in.vocab, in.ignore_index);
}

// The hooks each library implements once; c_api.cpp turns them into the exported C functions. Except probe, every
// hook is called by run_checked only: with arguments that passed check_forward / check_backward, rows > 0, and
// `fn`, the exported function's name to report errors under.
namespace device {
extern const char* const kKind;  // "cpu" | "cuda"
Status probe(const sirl_launch& launch);
// *bytes is 0 on entry.
Status forward_workspace_bytes(const char* fn, const sirl_forward_args& args, const sirl_launch& launch,
                               uint64_t* bytes);
Status logits_forward(const char* fn, const sirl_forward_args& args, const sirl_launch& launch);
Status logits_backward(const char* fn, const sirl_backward_args& args, const sirl_launch& launch);
}  // namespace device

// Every exported function returns through here: the status code, with its message kept for sirl_last_error()
// (cleared on success). An escaping C++ exception (allocation failure, thread creation) becomes an error, never
// an abort across the C boundary.
std::string& last_error_message();

template <typename F>
int32_t run_exported(const char* fn, F&& body) noexcept {
  Status st;
  try {
    st = body();
  } catch (const std::exception& e) {
    st = device_error(fn, std::string("unexpected C++ exception: ") + e.what());
  } catch (...) {
    st = device_error(fn, "unexpected C++ exception");
  }
  try {
    last_error_message() = st.message;
  } catch (...) {  // out of memory for the message itself: the code still says what happened
  }
  return static_cast<int32_t>(st.code);
}

inline Status check_args(const sirl_forward_args& a, const char* fn) { return check_forward(a, fn); }
inline Status check_args(const sirl_backward_args& a, const char* fn) { return check_backward(a, fn); }

// The one path of every exported forward / backward entry point (c_api.cpp, and libsirl_cpu's reference): null
// pointers rejected, the direction's checks (under `check_as`, the name whose contract they are), nothing to do
// for rows == 0, then hook(args, launch) with checked arguments. Every check runs before the hook, so before any
// device call.
template <typename Args, typename Hook>
int32_t run_checked(const char* fn, const char* check_as, const Args* args, const sirl_launch* launch, Hook&& hook) {
  return run_exported(fn, [&]() -> Status {
    if (args == nullptr || launch == nullptr) return invalid(fn, "args or launch is a null pointer");
    Status st = check_args(*args, check_as);
    if (!st.ok() || args->in.rows == 0) return st;
    return hook(*args, *launch);
  });
}

}  // namespace sirl
