"""Backend "triton": fused Triton kernels (CUDA GPUs; CPU tensors under ``TRITON_INTERPRET=1``).

- logits input (``logits.py``): forward is one pass over V per row with a per-thread online (max, sumexp,
  weighted sum) state in fp32, reduced across the block once per row; with too few rows to fill the GPU's waves
  (counted from the compiled kernel's resident CTAs per SM), V is split across programs and a second kernel
  merges the partial states in a fixed order (no atomics, deterministic). Backward recomputes p from the saved
  row stats (max, log-sum) and writes the coefficient form of ``backends/rows.py`` (per-row alpha, beta, lam) in
  one pass, optionally into the
  logits' own storage (``out=logits``, behind ``token_logprobs_entropy(..., inplace_backward=True)``). Both main
  loops are laid out for the instruction count (<= 12 SASS instructions per logit on sm_90, 16-byte loads for
  any V: docs/triton-kernels.md).
- fused linear (``linear.py``): the forward forms logits tiles of ``hidden @ weight.T (+ bias)`` with ``tl.dot``
  and consumes them in registers (no logits in memory: ``chunk_size`` has nothing to bound there), its programs
  in L2-sized row groups. The backward is chunked over the vocabulary: it recomputes each logits tile once,
  writes dL/dlogits of a vocabulary chunk of all rows into a workspace in the input dtype, and forms that slice
  of dW (complete, written once) and the chunk's share of dX (summed in fp32) with fixed-order GEMMs (cuBLAS
  on a GPU: reproducible as cuBLAS is, on the same GPU model and cuBLAS version): 8·N·D·V flops in all, fp32
  accumulation, no atomics; only the gradients asked for are computed.
- ``batch_invariant=True`` (both forwards): the split count from V alone (``_sizes.batch_invariant_splits``) and
  the fused linear's tiles of a large N, so a row's outputs do not depend on N, the other rows or its position;
  under the interpreter the fused tiles are an order-fixed sum instead of numpy's BLAS matmul
  (``linear.linear_forward``, docs/triton-fused-linear.md).
- ``utils.py``: the target architectures, the tile tables, occupancy and waves, and the one launch helper (every
  launch under its tensors' device). The AOT compile, SASS counts, interpreter instrumentation and the GPU model
  live outside the package, in the checkout's ``tools/``.
- Labels outside [0, V) that are not ignore_index (``check_labels=False``) give NaN rows and are never used as
  an offset; a NaN anywhere in a row gives NaN outputs for it whatever the GPU's max does with NaN. The
  launchers never read tensor values (no host synchronisation; they run on ``meta`` tensors in the AOT tool).

Importing this package never fails because of Triton: if ``import triton`` fails the backend only reports
itself unavailable, with the reason.
"""

from __future__ import annotations

import torch

from sirl_kernels.backends.rows import LinearRows, RowOutputs, Rows

name = "triton"
stats_units = "x"  # stats[:, 0] is the max of the raw logits x (the contract's Backend.stats_units)

try:
    import triton  # noqa: F401

    from sirl_kernels.backends.triton import linear as _linear
    from sirl_kernels.backends.triton import logits as _logits
    from sirl_kernels.backends.triton import utils as _utils

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # noqa: BLE001 - any failure only makes the backend unavailable
    _IMPORT_ERROR = exc


def unavailable_reason(device: torch.device | None) -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton is not importable: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
    dev_type = None if device is None else torch.device(device).type
    if dev_type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if dev_type in (None, "cpu"):
        if _utils.INTERPRET:
            return None
        if dev_type is None and torch.cuda.is_available():
            return None
        return ("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before sirl_kernels imports "
                "its Triton backend)")
    return f"Triton does not run on {dev_type} tensors"


def _require():
    if _IMPORT_ERROR is not None:
        raise RuntimeError(unavailable_reason(None))


def logits_forward(rows: Rows, extras=None, batch_invariant=False) -> RowOutputs:
    """``extras``: ``rows.Extras`` ([N] fp32 self-certainty / varentropy to fill, or None), same pass.
    ``batch_invariant``: the split count from V alone (``_sizes.batch_invariant_splits``), not from N."""
    _require()
    with _utils.quiet():
        return _logits.logits_forward(rows, extras, batch_invariant=batch_invariant)


def logits_backward(rows: Rows, stats, coef, out=None):
    """``coef``: ``rows.Coefficients`` (alpha, beta, lam, optional gamma and delta); ``out=logits`` writes the
    gradient over the logits (in place)."""
    _require()
    with _utils.quiet():
        return _logits.logits_backward(rows, stats, coef, out=out)


def linear_forward(rows: LinearRows, chunk_size, extras=None, batch_invariant=False) -> RowOutputs:
    """``chunk_size`` is not needed: the forward materialises no logits (so no result depends on it).
    ``batch_invariant``: tiles and split count from V, D and the dtype alone, not from N (``linear.linear_forward``)."""
    _require()
    with _utils.quiet():
        return _linear.linear_forward(rows, extras, batch_invariant=batch_invariant)


def linear_backward(rows: LinearRows, stats, coef, chunk_size, needs_grad):
    """Holds at most ``chunk_size x V`` values of the logits gradient (in the input dtype) at once: all rows of a
    vocabulary chunk (rows are chunked too only when not even one vocabulary tile of all rows fits)."""
    _require()
    with _utils.quiet():
        return _linear.linear_backward(rows, stats, coef, chunk_size, needs_grad)
