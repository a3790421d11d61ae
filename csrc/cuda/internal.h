// Host-side helpers shared by the launchers (torch-free, no CUDA calls except where named).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "sirl/host_api.h"

namespace sirl_cuda {
namespace detail {

// Counts a CUDA runtime call about to be made (see cuda_runtime_calls()).
void note_cuda_call();

// Wraps the result of a CUDA runtime call.
sirl::Status cuda_status(const char* fn, const char* what, cudaError_t err);

// The launch grid: one block per work item, grid-stride beyond this many blocks.
constexpr int64_t kMaxGridBlocks = int64_t{1} << 24;

}  // namespace detail
}  // namespace sirl_cuda
