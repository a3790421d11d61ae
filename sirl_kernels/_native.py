"""The native kernel libraries and their one binding: ``libsirl_cpu.so`` and ``libsirl_cuda.so`` implement the same C
ABI (``csrc/include/sirl/c_api.h``), loaded here with ctypes and shared by the "cpu" and "cuda" backends.

Why an ``extern "C"`` library and ctypes rather than a torch extension or pybind11: the libraries include no torch and
no Python header, so one binary works with every torch >= 2.6 and every CPython (the wheel is ``py3-none-<platform>``,
and ``pip install .`` builds with build isolation, no torch in sight); ctypes releases the GIL for each call; and a
library that cannot load or cannot run here (not built, a missing driver) is an ``OSError`` or a status turned into
the reason ``available_backends()`` reports, never a crash at import. The torch side (custom ops, fake
implementations, autograd, input checks) stays in Python (``sirl_kernels.ops``/``api``); this module only passes data
pointers, sizes and int64 strides, and turns a status into a typed exception with the library's one-line message.

``$SIRL_KERNELS_LIB_DIR`` names a folder searched first (a build tree, e.g. ``build/cmake/csrc/cpu``).
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, byref, c_char_p, c_double, c_int32, c_int64, c_uint64, c_void_p
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sirl_kernels._checks import check_row_tensors
from sirl_kernels.backends.rows import RowOutputs, Rows

ABI_VERSION = 4  # SIRL_ABI_VERSION of c_api.h
LIB_DIR_ENV = "SIRL_KERNELS_LIB_DIR"

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # sirl_dtype


# The structs of c_api.h, field for field (the loader checks their sizes against the library's).
class RowsStruct(ctypes.Structure):
    _fields_ = [("logits", c_void_p), ("rows", c_int64), ("vocab", c_int64), ("row_stride", c_int64),
                ("labels", c_void_p), ("label_stride", c_int64), ("temperature", c_double),
                ("ignore_index", c_int64), ("dtype", c_int32)]


class ForwardArgs(ctypes.Structure):
    _fields_ = [("rows", RowsStruct), ("logprobs", c_void_p), ("entropy", c_void_p), ("stats", c_void_p),
                ("self_certainty", c_void_p), ("varentropy", c_void_p)]


class BackwardArgs(ctypes.Structure):
    _fields_ = [("rows", RowsStruct), ("stats", c_void_p), ("alpha", c_void_p), ("beta", c_void_p), ("lam", c_void_p),
                ("grad_logits", c_void_p), ("grad_row_stride", c_int64), ("gamma", c_void_p), ("delta", c_void_p)]


class Launch(ctypes.Structure):
    _fields_ = [("stream", c_void_p), ("workspace", c_void_p), ("workspace_bytes", c_uint64), ("device", c_int32),
                ("num_threads", c_int32), ("num_splits", c_int32)]


_STRUCTS = {0: RowsStruct, 1: ForwardArgs, 2: BackwardArgs, 3: Launch}  # sirl_struct codes

_FORWARD = (c_int32, [POINTER(ForwardArgs), POINTER(Launch)])
_BACKWARD = (c_int32, [POINTER(BackwardArgs), POINTER(Launch)])
# Every exported function: (restype, argtypes), as c_api.h declares it.
SIGNATURES = {
    "sirl_abi_version": (c_int32, []),
    "sirl_last_error": (c_char_p, []),
    "sirl_struct_size": (c_uint64, [c_int32]),
    "sirl_device_kind": (c_char_p, []),
    "sirl_probe": (c_int32, [POINTER(Launch)]),
    "sirl_forward_workspace_bytes": (c_int32, [POINTER(ForwardArgs), POINTER(Launch), POINTER(c_uint64)]),
    "sirl_logits_forward": _FORWARD,
    "sirl_logits_backward": _BACKWARD,
    # libsirl_cpu only
    "sirl_cpu_isa": (c_char_p, []),
    "sirl_cpu_set_isa": (c_int32, [c_char_p, POINTER(c_char_p)]),
    "sirl_cpu_advise_hugepages": (c_int32, [c_void_p, c_uint64]),
    "sirl_cpu_exp": (c_int32, [c_void_p, c_void_p, c_int64, c_int32]),
    "sirl_cpu_convert": (c_int32, [c_void_p, c_int32, c_void_p, c_int32, c_int64]),
    "sirl_cpu_fixed_order_logits": (c_int32, [c_void_p, c_int32, c_int64, c_int64, c_int64, c_void_p, c_int64,
                                              c_int64, c_void_p, c_int64, c_int32]),
    "sirl_reference_logits_forward": _FORWARD,
    "sirl_reference_logits_backward": _BACKWARD,
}

# sirl_status -> the exception a failed call raises.
_ERRORS = {1: ValueError, 2: TypeError, 3: RuntimeError}


def library_file(kind: str) -> str:
    return f"libsirl_{kind}.so"


def search_dirs() -> list[Path]:
    """``$SIRL_KERNELS_LIB_DIR``, then every folder of the ``sirl_kernels`` package (an installed wheel keeps the
    libraries beside this file; an editable install lists its build output among the package's folders)."""
    import sirl_kernels

    dirs = [Path(os.environ[LIB_DIR_ENV])] if os.environ.get(LIB_DIR_ENV) else []
    return dirs + [Path(p) for p in sirl_kernels.__path__]


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"the native kernels take float32, bfloat16 or float16 logits, got {dtype}") from None


def _rows(rows: Rows) -> RowsStruct:
    """The C ABI's ``sirl_rows`` of ``rows``, after checking what the C side relies on."""
    logits, labels, temperature, ignore_index = rows
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along V, got strides {logits.stride()}")
    if labels.dim() != 1 or labels.shape[0] != n or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {logits.device}")
    return RowsStruct(logits.data_ptr(), n, vocab, logits.stride(0), labels.data_ptr(), labels.stride(0),
                float(temperature), int(ignore_index), dtype_code(logits.dtype))


class NativeLibrary:
    """One loaded ``libsirl_<kind>.so``: its functions with their C signatures, and calls that raise on error."""

    def __init__(self, kind: str, path: Path):
        self.kind = kind
        self.path = path
        self._dll = ctypes.CDLL(str(path))
        self._functions: dict[str, Callable[..., Any]] = {}
        version = self.fn("sirl_abi_version")()
        if version != ABI_VERSION:
            raise OSError(f"{path} has C ABI version {version}, this sirl_kernels expects {ABI_VERSION}: the package "
                          "and its native library come from different builds (reinstall sirl-kernels)")
        for code, struct in _STRUCTS.items():
            if self.fn("sirl_struct_size")(code) != ctypes.sizeof(struct):
                raise OSError(f"{path}: struct {struct.__name__} has a different layout than sirl_kernels._native's")

    def fn(self, name: str):
        """The exported function ``name`` with its declared signature."""
        if name not in self._functions:
            func = getattr(self._dll, name)
            func.restype, func.argtypes = SIGNATURES[name]
            self._functions[name] = func
        return self._functions[name]

    def last_error(self) -> str:
        return (self.fn("sirl_last_error")() or b"").decode("utf-8", "replace")

    def call(self, name: str, *args) -> None:
        """Calls ``name``; a non-zero status raises ValueError, TypeError or RuntimeError with the library's message."""
        status = self.fn(name)(*args)
        if status != 0:
            raise _ERRORS.get(status, RuntimeError)(f"libsirl_{self.kind}: {self.last_error()}")

    def probe(self, launch: Launch) -> str | None:
        """None if the library can run on ``launch.device`` here, else why not."""
        return None if self.fn("sirl_probe")(byref(launch)) == 0 else self.last_error()

    def logits_forward(self, rows: Rows, launch: Launch, entry: str = "sirl_logits_forward",
                       extras=None) -> RowOutputs:
        """``(logprobs, entropy, stats [N, 2])``, fp32, on the logits' device. ``extras`` (``rows.Extras`` of fp32
        ``[N]`` tensors or None, each filled in place) asks for self-certainty and varentropy in the same pass. The
        CUDA library's split-V workspace is allocated here by torch (on the current stream, like the kernels)."""
        logits = rows.logits
        n = logits.shape[0]
        f32 = dict(dtype=torch.float32, device=logits.device)
        logprobs, entropy, stats = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty((n, 2), **f32)
        sc, ve = (None, None) if extras is None else extras
        outs = {}
        for key, t in (("self_certainty", sc), ("varentropy", ve)):
            if t is None:
                continue
            check_row_tensors(n, logits.device, torch.float32, **{key: t})
            # the C side writes dense rows: a strided view is filled through a contiguous buffer
            outs[key] = (t, t if t.is_contiguous() else torch.empty(n, **f32))
        args = ForwardArgs(_rows(rows), logprobs.data_ptr(), entropy.data_ptr(),
                           stats.data_ptr(), *(outs[k][1].data_ptr() if k in outs else None
                                               for k in ("self_certainty", "varentropy")))
        workspace, size = None, c_uint64(0)
        self.call("sirl_forward_workspace_bytes", byref(args), byref(launch), byref(size))
        if size.value:
            workspace = torch.empty(size.value, dtype=torch.uint8, device=logits.device)
            launch.workspace, launch.workspace_bytes = workspace.data_ptr(), size.value
        self.call(entry, byref(args), byref(launch))
        for t, buf in outs.values():
            if buf is not t:
                t.copy_(buf)
        return RowOutputs(logprobs, entropy, stats)

    def fixed_order_logits(self, out, hidden, weight, num_threads: int):
        """``out[n, v] = sum_d hidden[n, d] weight[v, d]`` (libsirl_cpu only), each output one fixed chain over d
        (``sirl_cpu_fixed_order_logits``): batch-invariant. Shapes, dtypes and strides are checked by the caller
        (``backends.cpu.fixed_order_logits``); returns ``out``."""
        rows, dim = hidden.shape
        vocab = weight.shape[0]
        self.call("sirl_cpu_fixed_order_logits", hidden.data_ptr(), dtype_code(hidden.dtype), rows, dim,
                  hidden.stride(0), weight.data_ptr(), vocab, weight.stride(0), out.data_ptr(), out.stride(0),
                  int(num_threads))
        return out

    def logits_backward(self, rows: Rows, stats, coef, out, launch: Launch, entry: str = "sirl_logits_backward"):
        """Writes the logits' gradient of the backward form (``backends/rows.py``; ``coef`` its
        ``Coefficients(alpha, beta, lam)``, fp32 ``[N]`` each) into ``out`` (``[N, V]``, the logits' dtype, unit
        stride along V; may be ``logits`` itself) and returns it."""
        logits = rows.logits
        c_rows = _rows(rows)
        if (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
                or (out.dim() == 2 and out.shape[1] > 1 and out.stride(1) != 1)):
            raise ValueError(f"out must be a {logits.dtype} {tuple(logits.shape)} tensor on {logits.device} with unit "
                             f"stride along V, got {out.dtype} {tuple(out.shape)} on {out.device} with strides "
                             f"{out.stride()}")
        alpha, beta, lam, gamma, delta = (tuple(coef) + (None, None))[:5]
        terms = {k: t for k, t in (("gamma", gamma), ("delta", delta)) if t is not None}
        check_row_tensors(logits.shape[0], logits.device, torch.float32, stats=stats, alpha=alpha, beta=beta,
                          lam=lam, **terms)
        # Contiguous copies only where a view is strided (an expanded zero coefficient): the C side reads dense rows.
        stats, alpha, beta, lam = stats.contiguous(), alpha.contiguous(), beta.contiguous(), lam.contiguous()
        terms = {k: t.contiguous() for k, t in terms.items()}  # gamma / delta absent: null, the plain kernels
        args = BackwardArgs(c_rows, stats.data_ptr(), alpha.data_ptr(), beta.data_ptr(), lam.data_ptr(),
                            out.data_ptr(), out.stride(0),
                            *(terms[k].data_ptr() if k in terms else None for k in ("gamma", "delta")))
        self.call(entry, byref(args), byref(launch))
        return out


_LOADED: dict[str, NativeLibrary | str] = {}


def load(kind: str) -> NativeLibrary | str:
    """``libsirl_<kind>.so`` loaded once (kind "cpu" or "cuda"), or the reason it cannot be (a str)."""
    if kind not in _LOADED:
        _LOADED[kind] = _load(kind)
    return _LOADED[kind]


def require(kind: str) -> NativeLibrary:
    """``libsirl_<kind>.so``, or RuntimeError saying why backend ``kind`` cannot use it."""
    lib = load(kind)
    if isinstance(lib, str):
        raise RuntimeError(f"backend {kind!r} is unusable: {lib}")
    return lib


def _load(kind: str) -> NativeLibrary | str:
    name = library_file(kind)
    dirs = search_dirs()
    path = next((d / name for d in dirs if (d / name).is_file()), None)
    if path is None:
        where = ", ".join(str(d) for d in dirs)
        if kind == "cuda":
            return (f"{name} is not in this install (searched {where}): it is built only where nvcc is found at "
                    "install time; see docs/cuda.md")
        return f"{name} is not in this install (searched {where}): reinstall with `pip install .` from the repository"
    try:
        return NativeLibrary(kind, path)
    except OSError as exc:
        return f"{name} failed to load: {exc}"
