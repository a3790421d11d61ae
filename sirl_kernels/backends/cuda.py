"""Backend "cuda": hand-written CUDA kernels (csrc/cuda) in ``libsirl_cuda.so`` (C ABI, loaded by
``sirl_kernels._native``), launched on torch's current stream of the tensors' device.

The library links the CUDA runtime statically, so it loads without a driver and works beside any CUDA build of
torch; before first use on a device it is probed (driver present and new enough, the device exists, a kernel image
of this build runs on it: sm_80, sm_90a, or compute_90 PTX for newer GPUs), and a failed probe is the reason
``available_backends()`` reports. The fused-linear ops are the shared chunked driver (``chunked_linear``) over these
kernels: fp32 chunk logits from cuBLAS, the gradient in place, GEMMs for d hidden and d weight.
"""

from __future__ import annotations

import torch

from sirl_kernels import _native
from sirl_kernels._sizes import batch_invariant_splits
from sirl_kernels.backends import chunked_linear
from sirl_kernels.backends.rows import RowOutputs, Rows

name = "cuda"
stats_units = "x"  # stats[:, 0] is the max of the raw logits x (the contract's Backend.stats_units)

_PROBED: dict[int, str | None] = {}  # device index -> None (usable) or why not


def unavailable_reason(device: torch.device | None) -> str | None:
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    if device is not None and device.type != "cuda":
        return f"runs on CUDA tensors only, not {device.type}"
    lib = _native.load("cuda")
    if isinstance(lib, str):
        return lib
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if index not in _PROBED:
        _PROBED[index] = lib.probe(_native.Launch(device=index))
    return _PROBED[index]


def library() -> _native.NativeLibrary:
    return _native.require("cuda")


def _launch(logits: torch.Tensor, num_splits: int = 0) -> _native.Launch:
    if logits.device.type != "cuda":
        raise ValueError(f"backend 'cuda' takes CUDA tensors, got one on {logits.device}")
    stream = torch.cuda.current_stream(logits.device)
    return _native.Launch(stream=stream.cuda_stream, device=logits.device.index, num_splits=int(num_splits))


def logits_forward(rows: Rows, extras=None, batch_invariant=False, num_splits: int = 0) -> RowOutputs:
    """``extras`` (``rows.Extras``): self-certainty / varentropy filled in the same pass (the kernels' specialised
    instantiation; the plain one when None). ``num_splits``: vocabulary segments per row (0 chooses; more than one
    only for too few rows to fill the GPU); ``batch_invariant`` forces ``batch_invariant_splits(V)`` whatever N
    (one block per row segment, merged in segment order: a row's sums then depend on V alone). The fused linear's
    batch-invariant logits come from ``fixed_order.matmul_into`` (2 D elementwise passes per chunk: slow; the
    "triton" backend keeps its tiles fixed instead)."""
    if batch_invariant:
        num_splits = batch_invariant_splits(rows.logits.shape[1])
    return library().logits_forward(rows, _launch(rows.logits, num_splits), extras=extras)


def logits_backward(rows: Rows, stats, coef, out=None):
    logits = rows.logits
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return library().logits_backward(rows, stats, coef, out, _launch(logits))


linear_forward, linear_backward = chunked_linear.bind(logits_forward, logits_backward)
