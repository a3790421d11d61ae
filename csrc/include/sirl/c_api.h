/* The C ABI of the sirl-kernels native libraries: ONE schema, implemented once per device by libsirl_cpu.so
 * (csrc/cpu) and libsirl_cuda.so (csrc/cuda), loaded from Python with ctypes (sirl_kernels/_native.py).
 *
 * Why a C ABI and not a Python extension: neither library includes a torch or Python header, so one binary serves
 * every CPython and every torch (the wheel is tagged py3-none-<platform>), and a library that cannot load or run
 * here is a plain error turned into a reason by the loader, never an import-time crash. ctypes releases the GIL
 * for the duration of each call.
 *
 * Conventions: sizes, strides and offsets are int64 and counted in elements; per-row vectors are contiguous fp32;
 * every function returns a sirl_status and, when it is not SIRL_OK, leaves a one-line message for
 * sirl_last_error() (per thread). Arguments are checked before any work or device call, so a rejected call
 * touches nothing. Label values are never rejected: a label outside [0, vocab) that is not ignore_index gives
 * NaN outputs, NaN stats and a NaN gradient row, and its row is never indexed by it.
 *
 * The math: csrc/include/sirl/online_state.h. Bump SIRL_ABI_VERSION on any change to this file.
 */
#ifndef SIRL_C_API_H_
#define SIRL_C_API_H_

#include <stdint.h>

#define SIRL_ABI_VERSION 4

#define SIRL_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sirl_dtype { SIRL_FLOAT32 = 0, SIRL_BFLOAT16 = 1, SIRL_FLOAT16 = 2 } sirl_dtype;

typedef enum sirl_status {
  SIRL_OK = 0,
  SIRL_INVALID_ARGUMENT = 1,  /* a null pointer, a negative size, overlapping rows, a bad temperature, ... */
  SIRL_UNSUPPORTED_DTYPE = 2,
  SIRL_DEVICE_ERROR = 3,      /* the device cannot run this (no driver, no kernel image) or a launch failed */
} sirl_status;

/* The logits rows a call reads and their labels: logits [rows, vocab] of `dtype` with unit stride along the
 * vocabulary and row_stride elements between rows (0 repeats one row), labels [rows] int64 with label_stride. */
typedef struct sirl_rows {
  const void* logits;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  const int64_t* labels;
  int64_t label_stride;
  double temperature;     /* > 0, with (float)(1 / temperature) finite: the factor the kernels multiply by */
  int64_t ignore_index;   /* rows with this label get 0 outputs, 0 stats and a zero gradient */
  int32_t dtype;          /* a sirl_dtype */
} sirl_rows;

/* Forward: per row, logprob = log softmax(z)[label] and entropy = H(softmax(z)) with z = logits / T, and
 * stats [rows, 2] = (row max, log sum exp(z - max z)), all contiguous fp32. The stats are for the backward of the
 * same library only, and every forward and backward entry point of one library keeps them in that library's one
 * unit (any of its forwards pairs with any of its backwards, any ISA build or the reference): the row max is the
 * max of the RAW logits in both libraries (their kernels scale differences x - max, exact near the top of the row;
 * libsirl_cuda: row_state.h's finish_raw and grad_row). */
typedef struct sirl_forward_args {
  sirl_rows in;
  float* logprobs;
  float* entropy;
  float* stats;
  /* Optional [rows] fp32 outputs, NULL when not wanted (the kernels then keep no accumulator for them; either
   * non-NULL runs the specialised kernels that keep both): self_certainty = KL(U || p) = lse(z) - mean(z) - log V
   * (+inf for a row with a -inf logit) and varentropy = Var_p[log p] (clamped at 0); ignored rows 0, rows with a
   * label outside [0, vocab), NaN rows and all -inf rows NaN. */
  float* self_certainty;
  float* varentropy;
} sirl_forward_args;

/* Backward: the backward form of sirl_kernels/backends/rows.py w.r.t. the logits, in the logits' dtype, from the
 * stats of the same library's forward and per-row coefficients alpha, beta, lam (and the optional gamma, delta;
 * [rows] contiguous fp32 each): with L_i = log p_i from the stats,
 * d logits_i = (p_i (alpha + beta L_i + gamma L_i^2) + delta + lam [i == label]) / T, the label's column formed as
 * (p_y (alpha + lam + beta L_y + gamma L_y^2) - lam expm1(L_y) + delta) / T, columns with p_i == 0 exactly delta / T
 * (0 without delta), ignored rows 0 and rows with a label outside [0, vocab) NaN. The gradient of sum(g_lp * logprob + g_h * entropy) is
 * alpha = -g_lp - g_h * entropy, beta = -g_h, lam = g_lp. grad_logits may be in.logits itself (in place) with
 * grad_row_stride == in.row_stride; any other overlap is an error the library cannot see. */
typedef struct sirl_backward_args {
  sirl_rows in;
  const float* stats;
  const float* alpha;
  const float* beta;
  const float* lam;
  void* grad_logits;
  int64_t grad_row_stride;
  /* Optional terms of the backward form, NULL when absent (both NULL: the plain kernels run unchanged):
   * d logits_i += (p_i gamma log p_i^2 + delta) / T, so columns with p_i == 0 are exactly delta / T. */
  const float* gamma;
  const float* delta;
} sirl_backward_args;

/* How a call runs. Fields a library does not use are ignored (zero them). */
typedef struct sirl_launch {
  void* stream;             /* CUDA: the cudaStream_t to launch on (torch's current stream) */
  void* workspace;          /* CUDA: device scratch of sirl_forward_workspace_bytes() bytes (NULL when 0) */
  uint64_t workspace_bytes;
  int32_t device;           /* CUDA: the device index of every pointer */
  int32_t num_threads;      /* CPU: threads sharing the rows (each row is reduced by one thread in a fixed order,
                               so results never depend on it); <= 1 runs on the calling thread */
  int32_t num_splits;       /* CUDA: vocabulary segments of the forward; 0 chooses */
} sirl_launch;

typedef enum sirl_struct { SIRL_STRUCT_ROWS = 0, SIRL_STRUCT_FORWARD_ARGS = 1, SIRL_STRUCT_BACKWARD_ARGS = 2,
                           SIRL_STRUCT_LAUNCH = 3 } sirl_struct;

/* ---- implemented by every library ------------------------------------------------------------------------- */
SIRL_API int32_t sirl_abi_version(void);
SIRL_API const char* sirl_last_error(void);          /* this thread's last error message ("" if none) */
SIRL_API uint64_t sirl_struct_size(int32_t which);   /* sizeof a sirl_struct, for the loader's layout check */
SIRL_API const char* sirl_device_kind(void);         /* "cpu" or "cuda" */
/* Whether this library can run on launch->device here: SIRL_OK, or SIRL_DEVICE_ERROR and why (CUDA: no driver,
 * a driver older than the runtime this library was built with, no such device, no kernel image for it). */
SIRL_API int32_t sirl_probe(const sirl_launch* launch);
SIRL_API int32_t sirl_forward_workspace_bytes(const sirl_forward_args* args, const sirl_launch* launch,
                                              uint64_t* bytes);
SIRL_API int32_t sirl_logits_forward(const sirl_forward_args* args, const sirl_launch* launch);
SIRL_API int32_t sirl_logits_backward(const sirl_backward_args* args, const sirl_launch* launch);

/* ---- libsirl_cpu only ------------------------------------------------------------------------------------- */
SIRL_API const char* sirl_cpu_isa(void);             /* the kernel build in use: "avx512", "avx2" or "baseline" */
/* Caps the build ("avx512", "avx2", "baseline", or "auto" for the best this CPU runs); *chosen gets its name. */
SIRL_API int32_t sirl_cpu_set_isa(const char* name, const char** chosen);
/* Asks for transparent huge pages over [data, data + bytes) before its first touch (only memory mapping changes,
 * never values; a refusal by the kernel is not an error). */
SIRL_API int32_t sirl_cpu_advise_hugepages(void* data, uint64_t bytes);
/* Test hooks on the active build: 0 the vector exp (any x), 1 the backward's exp (x <= 0), 2 the forward's base-2
 * exp of x <= 0; and the dtype conversions (round to nearest even). */
SIRL_API int32_t sirl_cpu_exp(const float* x, float* y, int64_t n, int32_t variant);
SIRL_API int32_t sirl_cpu_convert(const void* src, int32_t src_dtype, void* dst, int32_t dst_dtype, int64_t n);
/* Batch-invariant logits: out[n, v] = sum_d hidden[n, d] weight[v, d] (fp32 out, n < rows, v < vocab), hidden
 * [rows, dim] and weight [vocab, dim] of one dtype (fp32, bf16, fp16; converted to fp32 exactly), unit stride along
 * dim, row strides in elements; out has unit stride along vocab. Each output is one fixed sequential chain over
 * d = 0..dim-1 (FMA on the AVX2/AVX-512 builds, rounded multiply then add on baseline), so it is a pure function of
 * (hidden row, weight row) for a given build: independent of rows, the row's position, num_threads and the
 * blocking (csrc/cpu/fixed_order_logits.inc). dim == 0 writes +0. */
SIRL_API int32_t sirl_cpu_fixed_order_logits(const void* hidden, int32_t dtype, int64_t rows, int64_t dim,
                                             int64_t stride_hidden, const void* weight, int64_t vocab,
                                             int64_t stride_weight, float* out, int64_t stride_out,
                                             int32_t num_threads);
/* The scalar reference: the same contract as sirl_logits_forward/backward, computed with nothing but
 * online_state.h's update, finalize, log_prob and grad_* (one thread, one element at a time), so the SIMD, CUDA
 * and Triton forms can be tested against the header itself. */
SIRL_API int32_t sirl_reference_logits_forward(const sirl_forward_args* args, const sirl_launch* launch);
SIRL_API int32_t sirl_reference_logits_backward(const sirl_backward_args* args, const sirl_launch* launch);

#ifdef __cplusplus
}
#endif

#endif /* SIRL_C_API_H_ */
