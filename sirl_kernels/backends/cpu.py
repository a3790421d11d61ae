"""Backend "cpu": the fused C++ kernels of csrc/cpu, in ``libsirl_cpu.so`` (C ABI, loaded by ``sirl_kernels._native``).

Logits: one pass over each row's memory per direction (the forward keeps the online-softmax state of
``csrc/include/sirl/online_state.h`` in fp32 and writes the row stats (max, log-sum); the backward recomputes p from
them), any row stride, fp32/bf16/fp16 inputs with fp32 math. Rows are split over ``torch.get_num_threads()`` threads
by the library (plain threads, not a second OpenMP runtime beside torch's); every row is reduced by one thread in a
fixed order, so results never depend on the thread count.

Fused linear: the shared chunked driver (``chunked_linear``) over these kernels, its fp32 chunk workspace on
transparent huge pages. Fresh gradients of the logits are also allocated on huge pages: first-touch page faults of a
multi-GB tensor otherwise cost more than the kernel (measured 1.2 s vs 0.2 s for 2.5 GB here). With
``batch_invariant=True`` each chunk's logits come from :func:`fixed_order_logits` (one FMA chain per logit, in the
order d = 0..D-1) instead of MKL, whose kernel depends on the number of rows.

The ISA build (AVX-512, AVX2 or baseline x86-64) is picked at load time from the CPU; ``$SIRL_KERNELS_CPU_ISA``
(``avx512`` | ``avx2`` | ``baseline`` | ``auto``, read once) caps it, any other value is a ValueError on use, and
:func:`set_isa` changes it at run time (tests).
"""

from __future__ import annotations

import ctypes
import os

import torch

from sirl_kernels import _native
from sirl_kernels.backends import chunked_linear
from sirl_kernels.backends.rows import RowOutputs, Rows

name = "cpu"
stats_units = "x"  # stats[:, 0] is the max of the raw logits x (the contract's Backend.stats_units)

_LIB = _native.load("cpu")
ISA_ENV = "SIRL_KERNELS_CPU_ISA"


def library() -> _native.NativeLibrary:
    return _native.require("cpu")


def set_isa(build: str) -> str:
    """Caps the kernel build ("avx512", "avx2", "baseline", or "auto" for the best); returns the one chosen."""
    chosen = ctypes.c_char_p()
    library().call("sirl_cpu_set_isa", str(build).encode(), ctypes.byref(chosen))
    return chosen.value.decode()


def _isa_env_error() -> str | None:
    """Why ``$SIRL_KERNELS_CPU_ISA`` is unusable, or None. Read once, at import, as the library reads it at load;
    the library's own ``set_isa`` judges the value (re-picking for a valid one what the library picked at load),
    so the list of builds lives in one place."""
    value = os.environ.get(ISA_ENV, "")
    if isinstance(_LIB, str) or not value:
        return None
    try:
        set_isa(value)
    except ValueError as exc:
        return f"${ISA_ENV}={value!r}: {exc}"
    return None


_ISA_ENV_ERROR = _isa_env_error()


def unavailable_reason(device: torch.device | None) -> str | None:
    """Raises ValueError for a bad ``$SIRL_KERNELS_CPU_ISA`` (asked about CPU tensors or no device): a typo there is
    an error, not a silent fall-back of "auto" to another backend."""
    if isinstance(_LIB, str):
        return _LIB
    if device is not None and torch.device(device).type != "cpu":
        return f"runs on CPU tensors only, got {torch.device(device).type}"
    if _ISA_ENV_ERROR is not None:
        raise ValueError(_ISA_ENV_ERROR)
    return None


def _launch() -> _native.Launch:
    return _native.Launch(num_threads=torch.get_num_threads())


def isa() -> str:
    """The kernel build in use: "avx512", "avx2" or "baseline"."""
    return library().fn("sirl_cpu_isa")().decode()


def empty_hugepage(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose pages the kernel is asked to back with transparent huge pages."""
    t = torch.empty(shape, dtype=dtype)
    library().call("sirl_cpu_advise_hugepages", t.data_ptr(), t.numel() * t.element_size())
    return t


def _cpu_only(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"backend 'cpu' takes CPU tensors, got one on {t.device}")


def logits_forward(rows: Rows, extras=None, batch_invariant=False) -> RowOutputs:
    """``extras`` (``rows.Extras``): self-certainty / varentropy filled in the same pass, by the kernels'
    instantiation that keeps their sums (the plain one runs when None). Always batch-invariant: one thread
    reduces each row, in an order fixed by V alone (tests/sirl_kernels/test_batch_invariant.py)."""
    _cpu_only(rows.logits, rows.labels)
    return library().logits_forward(rows, _launch(), extras=extras)


def logits_backward(rows: Rows, stats, coef, out=None):
    _cpu_only(rows.logits, rows.labels)
    if out is None:
        out = empty_hugepage(rows.logits.shape, rows.logits.dtype)
    return library().logits_backward(rows, stats, coef, out, _launch())


def _hugepage_workspace(rows, vocab, dtype, device):
    return empty_hugepage((rows, vocab), dtype)


# ---- batch-invariant logits matmul (fixed reduction order) ------------------------------------------------------
def fixed_order_logits(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[n, v] = sum_d hidden[n, d] * weight[v, d]`` in fp32, written into ``out`` (fp32 ``[rows, V]``, unit
    stride along V, any row stride) and returned. ``hidden`` ``[rows, D]`` and ``weight`` ``[V, D]``: one dtype
    (fp32, bf16 or fp16), unit stride along D. Every output is the same sequential chain over d = 0..D-1 (fp32 FMA
    on the AVX2/AVX-512 builds) whatever the number of rows, the row's position, the thread count
    (``torch.get_num_threads()``) or the blocking: batch-invariant, unlike an MKL GEMM
    (csrc/cpu/fixed_order_logits.inc)."""
    _cpu_only(out, hidden, weight)
    if hidden.dim() != 2 or weight.dim() != 2 or out.dim() != 2:
        raise ValueError(f"fixed_order_logits needs 2-D out, hidden, weight, got {tuple(out.shape)}, "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}")
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != dim or tuple(out.shape) != (rows, vocab):
        raise ValueError(f"fixed_order_logits: shapes do not match: hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)} (want [V, {dim}]), out {tuple(out.shape)} (want [{rows}, {vocab}])")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"fixed_order_logits: hidden is {hidden.dtype} but weight is {weight.dtype}")
    _native.dtype_code(hidden.dtype)  # TypeError for anything but fp32 / bf16 / fp16
    if out.dtype != torch.float32:
        raise TypeError(f"fixed_order_logits: out must be float32, got {out.dtype}")
    for label, t in (("hidden", hidden), ("weight", weight), ("out", out)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"fixed_order_logits: {label} must have unit stride along its last dim, got strides "
                             f"{t.stride()}")
        if t.shape[0] > 1 and t.stride(0) < 0:
            raise ValueError(f"fixed_order_logits: {label} has a negative row stride {t.stride()}")
    return library().fixed_order_logits(out, hidden, weight, torch.get_num_threads())


# The fused linear: the shared chunked driver over the kernels above (its batch-invariant mode forms each chunk's
# logits with fixed_order_logits instead of MKL).
linear_forward, linear_backward = chunked_linear.bind(logits_forward, logits_backward, _hugepage_workspace,
                                                      fixed_order_logits)


# ---- test hooks: the active build's vector exps and conversions on their own, and the header's scalar reference ----
def exp_hook(x: torch.Tensor, variant: int = 0) -> torch.Tensor:
    """0: the vector exp (any x); 1: the backward's exp (x <= 0); 2: the forward's base-2 exp of x <= 0."""
    x = x.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    library().call("sirl_cpu_exp", x.data_ptr(), y.data_ptr(), x.numel(), int(variant))
    return y


def convert_hook(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' load (to fp32) or store (from fp32, round to nearest even) conversion of a whole tensor."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=dtype)
    library().call("sirl_cpu_convert", x.data_ptr(), _native.dtype_code(x.dtype), y.data_ptr(),
                   _native.dtype_code(dtype), x.numel())
    return y


def reference_forward(rows: Rows, extras=None) -> RowOutputs:
    """The contract's forward computed by ``online_state.h`` alone, one element at a time (no SIMD)."""
    _cpu_only(rows.logits, rows.labels)
    return library().logits_forward(rows, _launch(),
                                    entry="sirl_reference_logits_forward", extras=extras)


def reference_backward(rows: Rows, stats, coef, out=None):
    """The contract's backward (the form of ``rows.py``) from ``online_state.h``'s ``log_prob`` and ``grad_*``
    alone."""
    _cpu_only(rows.logits, rows.labels)
    out = torch.empty_like(rows.logits, memory_format=torch.contiguous_format) if out is None else out
    return library().logits_backward(rows, stats, coef, out, _launch(),
                                     entry="sirl_reference_logits_backward")
