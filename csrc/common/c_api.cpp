// The exported C functions of c_api.h, written once and compiled into both libsirl_cpu and libsirl_cuda: each
// forwards to its library's sirl::device hooks (csrc/cpu/library.cpp, csrc/cuda/device.cpp) through
// sirl::run_exported, which keeps the error message for sirl_last_error().
#include "sirl/c_api.h"

#include <string>

#include "sirl/host_api.h"

namespace sirl {

std::string& last_error_message() {
  static thread_local std::string message;
  return message;
}

}  // namespace sirl

extern "C" {

SIRL_API int32_t sirl_abi_version(void) { return SIRL_ABI_VERSION; }

SIRL_API const char* sirl_last_error(void) { return sirl::last_error_message().c_str(); }

SIRL_API uint64_t sirl_struct_size(int32_t which) {
  switch (which) {
    case SIRL_STRUCT_ROWS:
      return sizeof(sirl_rows);
    case SIRL_STRUCT_FORWARD_ARGS:
      return sizeof(sirl_forward_args);
    case SIRL_STRUCT_BACKWARD_ARGS:
      return sizeof(sirl_backward_args);
    case SIRL_STRUCT_LAUNCH:
      return sizeof(sirl_launch);
    default:
      return 0;
  }
}

SIRL_API const char* sirl_device_kind(void) { return sirl::device::kKind; }

SIRL_API int32_t sirl_probe(const sirl_launch* launch) {
  return sirl::run_exported("sirl_probe", [&] {
    return launch ? sirl::device::probe(*launch) : sirl::invalid("sirl_probe", "launch is a null pointer");
  });
}

// The workspace query runs the forward's own checks, reported under the forward's name: a call the forward would
// reject fails here first, with the same message.
SIRL_API int32_t sirl_forward_workspace_bytes(const sirl_forward_args* args, const sirl_launch* launch,
                                              uint64_t* bytes) {
  const char* fn = "sirl_forward_workspace_bytes";
  if (bytes == nullptr) {
    return sirl::run_exported(fn, [&] { return sirl::invalid(fn, "bytes is a null pointer"); });
  }
  *bytes = 0;
  return sirl::run_checked(fn, "sirl_logits_forward", args, launch,
                           [&](const sirl_forward_args& a, const sirl_launch& l) {
                             return sirl::device::forward_workspace_bytes("sirl_logits_forward", a, l, bytes);
                           });
}

SIRL_API int32_t sirl_logits_forward(const sirl_forward_args* args, const sirl_launch* launch) {
  const char* fn = "sirl_logits_forward";
  return sirl::run_checked(fn, fn, args, launch, [&](const sirl_forward_args& a, const sirl_launch& l) {
    return sirl::device::logits_forward(fn, a, l);
  });
}

SIRL_API int32_t sirl_logits_backward(const sirl_backward_args* args, const sirl_launch* launch) {
  const char* fn = "sirl_logits_backward";
  return sirl::run_checked(fn, fn, args, launch, [&](const sirl_backward_args& a, const sirl_launch& l) {
    return sirl::device::logits_backward(fn, a, l);
  });
}

}  // extern "C"
