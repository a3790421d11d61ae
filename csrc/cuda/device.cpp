// libsirl_cuda: the device hooks of the C ABI (sirl/c_api.h): argument checks, the probe, the split-V plan and its
// workspace, and the launch on the caller's device and stream (torch's current stream, passed from Python).
//
// The CUDA runtime is linked statically (CMake: CUDA_RUNTIME_LIBRARY Static), so loading this library needs no
// driver; the first runtime call looks for libcuda.so.1, and sirl_probe turns every way that can fail (no driver,
// a driver older than this runtime, no such device, no kernel image for it) into a message.
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <string>

#include "internal.h"
#include "sirl/host_api.h"
#include "sirl/online_state.h"
#include "sirl_cuda.h"

#ifndef SIRL_CUDA_ARCHITECTURES
#define SIRL_CUDA_ARCHITECTURES "unknown"
#endif

namespace {

using sirl::Status;
using sirl_cuda::detail::cuda_status;
using sirl_cuda::detail::note_cuda_call;

// Makes a device current for a scope and restores the caller's. torch's own runtime shares the driver's
// per-thread context, so leaving another device current would move torch's later work.
class DeviceGuard {
 public:
  Status enter(const char* fn, int device) {
    note_cuda_call();
    Status st = cuda_status(fn, "cudaGetDevice", cudaGetDevice(&previous_));
    if (!st.ok() || previous_ == device) return st;
    note_cuda_call();
    st = cuda_status(fn, "cudaSetDevice", cudaSetDevice(device));
    switched_ = st.ok();
    return st;
  }
  ~DeviceGuard() {
    if (switched_) {
      note_cuda_call();
      (void)cudaSetDevice(previous_);
    }
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Multiprocessors of a device, queried once per device (the automatic split-V plan needs them).
Status multiprocessor_count(const char* fn, int device, int* count) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cacheable = device >= 0 && device < static_cast<int>(cache.size());
  if (cacheable && (*count = cache[device].load(std::memory_order_relaxed)) > 0) return sirl::ok();
  note_cuda_call();
  Status st = cuda_status(fn, "cudaDeviceGetAttribute(multiprocessor count)",
                          cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
  if (st.ok() && cacheable) cache[device].store(*count, std::memory_order_relaxed);
  return st;
}

// The split count of a forward: a forced one (launch.num_splits >= 1) is host arithmetic; the automatic one asks
// the device for its multiprocessor count.
Status plan_splits(const char* fn, const sirl_forward_args& a, const sirl_launch& launch, int* splits) {
  if (launch.num_splits < 0 || launch.num_splits > sirl_cuda::kMaxSplits) {
    return sirl::invalid(fn, "num_splits must be in [0, " + std::to_string(sirl_cuda::kMaxSplits) + "], got " +
                                 std::to_string(launch.num_splits));
  }
  int sms = 0;
  if (launch.num_splits == 0) {
    Status st = multiprocessor_count(fn, launch.device, &sms);
    if (!st.ok()) return st;
  }
  *splits = sirl_cuda::forward_num_splits(a.in.rows, a.in.vocab, sms, launch.num_splits);
  return sirl::ok();
}

// The minimum driver for a CUDA major version, for the probe's message.
std::string driver_hint(int cuda_major) {
  switch (cuda_major) {
    case 12:
      return " (driver 525 or newer)";
    case 13:
      return " (driver 580 or newer)";
    default:
      return "";
  }
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

}  // namespace

namespace sirl {
namespace device {

const char* const kKind = "cuda";

Status probe(const sirl_launch& launch) {
  const char* fn = "sirl_probe";
  int driver = 0;
  note_cuda_call();
  const cudaError_t driver_err = cudaDriverGetVersion(&driver);
  if (driver_err != cudaSuccess || driver == 0) {
    return device_error(fn, "no NVIDIA driver was found (libcuda.so.1 cannot be loaded)");
  }
  const int needed_major = CUDART_VERSION / 1000;
  if (driver / 1000 < needed_major) {
    return device_error(fn, "the NVIDIA driver supports CUDA " + version_string(driver) +
                                ", but libsirl_cuda was built with CUDA " + version_string(CUDART_VERSION) +
                                " and needs a driver for CUDA " + std::to_string(needed_major) + ".x" +
                                driver_hint(needed_major));
  }
  int count = 0;
  note_cuda_call();
  Status st = cuda_status(fn, "cudaGetDeviceCount", cudaGetDeviceCount(&count));
  if (!st.ok()) return st;
  if (launch.device < 0 || launch.device >= count) {
    return invalid(fn, "device " + std::to_string(launch.device) + " does not exist (" + std::to_string(count) +
                           " CUDA devices)");
  }
  DeviceGuard guard;
  st = guard.enter(fn, launch.device);
  if (!st.ok()) return st;
  int major = 0, minor = 0;
  note_cuda_call();
  (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, launch.device);
  note_cuda_call();
  (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, launch.device);
  st = sirl_cuda::kernel_image_status();
  if (!st.ok()) {
    st.message += " (device " + std::to_string(launch.device) + " has compute capability " + std::to_string(major) +
                  "." + std::to_string(minor) + "; this build holds " SIRL_CUDA_ARCHITECTURES ")";
  }
  return st;
}

Status forward_workspace_bytes(const char* fn, const sirl_forward_args& args, const sirl_launch& launch,
                               uint64_t* bytes) {
  int splits = 1;
  Status st = plan_splits(fn, args, launch, &splits);
  if (st.ok()) *bytes = sirl_cuda::forward_workspace_bytes(args.in.rows, splits, sirl::wants_extras(args));
  return st;
}

Status logits_forward(const char* fn, const sirl_forward_args& args, const sirl_launch& launch) {
  if (launch.workspace != nullptr && !aligned_to(launch.workspace, alignof(sirl::OnlineState))) {
    return invalid(fn, "workspace is not 4-byte aligned");
  }
  int splits = 1;
  Status st = plan_splits(fn, args, launch, &splits);
  if (!st.ok()) return st;
  const size_t needed = sirl_cuda::forward_workspace_bytes(args.in.rows, splits, sirl::wants_extras(args));
  if (splits > 1 && (launch.workspace == nullptr || launch.workspace_bytes < needed)) {
    if (launch.num_splits != 0) {
      return invalid(fn, std::to_string(splits) + " splits need a workspace of " + std::to_string(needed) +
                             " bytes, got " + std::to_string(launch.workspace == nullptr ? 0 : launch.workspace_bytes));
    }
    splits = 1;  // automatic choice: fall back to one block per row
  }
  DeviceGuard guard;
  st = guard.enter(fn, launch.device);
  if (!st.ok()) return st;
  return sirl_cuda::launch_logits_forward(args, splits, launch.workspace, static_cast<cudaStream_t>(launch.stream));
}

Status logits_backward(const char* fn, const sirl_backward_args& args, const sirl_launch& launch) {
  DeviceGuard guard;
  Status st = guard.enter(fn, launch.device);
  if (!st.ok()) return st;
  return sirl_cuda::launch_logits_backward(args, static_cast<cudaStream_t>(launch.stream));
}

}  // namespace device
}  // namespace sirl
