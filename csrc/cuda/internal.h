// Host-side helpers shared by the launchers (torch-free, no CUDA calls except where named).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "sirl_cuda.h"

namespace sirl_cuda {
namespace detail {

inline Status ok() { return Status{}; }

inline Status invalid(const char* fn, const std::string& what) {
  return Status{Code::kInvalidArgument, std::string(fn) + ": " + what};
}

// Counts a CUDA runtime call about to be made (see cuda_runtime_calls()).
void note_cuda_call();

// Wraps the result of a CUDA runtime call.
Status cuda_status(const char* fn, const char* what, cudaError_t err);

// The launch grid: one block per work item, grid-stride beyond this many blocks.
constexpr int64_t kMaxGridBlocks = int64_t{1} << 24;

inline bool dtype_supported(int dtype) { return dtype == kFloat32 || dtype == kBFloat16 || dtype == kFloat16; }

// (rows - 1) * stride + extent must fit in int64 (all kernel offsets are int64).
inline bool extent_fits(int64_t rows, int64_t stride, int64_t extent) {
  if (rows <= 1 || stride == 0) return true;
  return rows - 1 <= (std::numeric_limits<int64_t>::max() - extent) / stride;
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline bool temperature_ok(double t) { return std::isfinite(t) && t > 0.0; }

}  // namespace detail
}  // namespace sirl_cuda
