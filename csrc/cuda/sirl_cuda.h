// libsirl_cuda's internal launcher API, under the C ABI of sirl/c_api.h (device.cpp implements its hooks).
//
// The launchers take arguments already checked by sirl::check_forward / check_backward (sirl/host_api.h) and run
// on the device that device.cpp has made current, on the given stream. Every check runs on the host BEFORE any
// CUDA runtime call, so a bad call never touches the device (the host-only test_cuda_launchers relies on this and
// counts the calls).
//
// Math: csrc/include/sirl/online_state.h, shared with the CPU backend: z = x / T per row; the forward writes
// logprob = (z_y - max) - log s, the entropy and stats = (max, log s); the backward reads them back,
// log p_i = (z_i - max) - log s, dx_i = [p_i (alpha + beta log p_i) + lam 1[i = y]] / T with the row's coefficients
// (the backward form, sirl_kernels/backends/rows.py). Rows whose label is ignore_index get zeros and a zero gradient;
// rows whose label is outside [0, V) get NaN and a NaN gradient.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "sirl/c_api.h"
#include "sirl/host_api.h"

namespace sirl_cuda {

constexpr int kMaxSplits = 256;

// The split count the forward uses for these sizes (pure host arithmetic, no CUDA call). requested >= 1 is
// clamped to [1, min(kMaxSplits, segments of at least 8 elements)]; requested == 0 picks automatically: more than
// one split only when the rows are too few to fill num_sms multiprocessors.
int forward_num_splits(int64_t rows, int64_t vocab, int num_sms, int requested);
// Elements per vocabulary segment for a given split count (a multiple of 8, so segments stay 16-byte aligned
// whenever rows are).
int64_t forward_split_len(int64_t vocab, int num_splits);
// Workspace bytes for the partial states of a split forward (0 when num_splits <= 1); `extras`: states with the
// self-certainty and varentropy sums (sirl::ExtState), for a forward that asks for them.
size_t forward_workspace_bytes(int64_t rows, int num_splits, bool extras = false);

// num_splits as planned by forward_num_splits; more than one needs forward_workspace_bytes of workspace.
sirl::Status launch_logits_forward(const sirl_forward_args& args, int num_splits, void* workspace,
                                   cudaStream_t stream);
sirl::Status launch_logits_backward(const sirl_backward_args& args, cudaStream_t stream);

// Whether this build holds a kernel image the current device can run (cudaFuncGetAttributes on a forward kernel,
// which loads the module): the probe's last step.
sirl::Status kernel_image_status();

// How many CUDA runtime calls this library has made in this process (for the host-only tests, which assert that
// rejected or empty calls never reach the device).
int64_t cuda_runtime_calls();

}  // namespace sirl_cuda
