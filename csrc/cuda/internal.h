// Host-side helpers shared by the launchers (torch-free, no CUDA calls except where named).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
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

// Blocks for `items` work items at `per_block` items a block, clamped to [1, kMaxGridBlocks] (the kernels
// grid-stride over the rest).
inline unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, kMaxGridBlocks)));
}

}  // namespace detail
}  // namespace sirl_cuda
