"""Matrix products with fp32 accumulation whatever the operands' dtype, as the fused-linear numeric policy needs.

- A 16-bit output from 16-bit operands is ``torch.mm``: cuBLAS, and torch's CPU GEMM for bf16/fp16, accumulate in
  fp32 and round once to the output (tests/sirl_kernels/backends/test_matmul.py checks the CPU side against
  float64).
- An fp32 *output* from 16-bit operands on CUDA uses ``torch.mm(..., out_dtype=torch.float32)`` and, to
  accumulate, ``torch.addmm(out, ..., out_dtype=torch.float32, out=out)``, each where this torch runs it (probed
  once per device: torch 2.8-2.9 have the first but refuse the second's fp32 ``self``). Without ``addmm`` the
  product of a block of rows goes to an fp32 scratch block that is then added; without either, or on the CPU
  (``aten::mm.dtype`` is CUDA-only), the operands are upcast to fp32 in blocks of at most ``BLOCK_ELEMENTS``
  along the largest dimension and multiplied in fp32. Products of two bf16/fp16 values are exact in fp32, so
  every route is the same arithmetic as a tensor-core GEMM with fp32 accumulation (up to summation order), and
  never a copy of the whole weight.
- fp32 and float64 operands go straight to ``torch.mm`` / ``addmm_``, fp32 ones at IEEE fp32 precision whatever
  the process-wide setting says (:func:`ieee_fp32_matmul`): ``torch.set_float32_matmul_precision("high")`` would
  otherwise turn them into TF32 on CUDA (10 mantissa bits) or bf16x3 on some CPUs, silently breaking the fp32
  numeric policy of the fused-linear op.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# Upcast block: at most this many elements of an operand are held in fp32 at once (32 MiB).
BLOCK_ELEMENTS = 8 * 1024 * 1024

# (device type, device index, operand dtype, accumulate) -> whether that fp32-output call runs correctly there.
_FP32_OUT_SUPPORT: dict[tuple[str, int | None, torch.dtype, bool], bool] = {}


def _wide(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def _precision_backends():
    """The per-backend fp32 precision settings of torch >= 2.9 (``fp32_precision``), or () on older torch."""
    found = []
    for name in ("cuda", "mkldnn"):
        module = getattr(getattr(torch.backends, name, None), "matmul", None)
        if module is not None and hasattr(module, "fp32_precision"):
            found.append(module)
    return found


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Within the block fp32 matmuls run at IEEE fp32 precision (no TF32, no bf16 passes), and the caller's
    setting is restored after it, through the API the caller used: torch refuses to read a precision set through
    a mix of its legacy (``set_float32_matmul_precision``) and per-backend (``backends.*.matmul.fp32_precision``,
    torch >= 2.9) APIs. The legacy one when it reads a reduced precision; the per-backend one when the legacy one
    cannot be read (only the per-backend API was used) or reads "highest" while a backend says "tf32"/"bf16" (it
    was used last). Like the setting itself, this is process-wide state: a thread running fp32 matmuls
    concurrently sees it too."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the per-backend API was used
        legacy = None
    modules = _precision_backends()
    reduced = [m for m in modules if m.fp32_precision in ("tf32", "bf16")]
    if legacy is not None and legacy != "highest":
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    if legacy is not None and not reduced:
        yield
        return
    old = [m.fp32_precision for m in modules]
    for m in modules:
        m.fp32_precision = "ieee"
    try:
        yield
    finally:
        for m, value in zip(modules, old):
            m.fp32_precision = value


def _mm_fp32(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a @ b``: fp32 ``out``, 16-bit operands (CUDA)."""
    torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_fp32(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out += a @ b``: fp32 ``out``, 16-bit operands (CUDA, torch >= 2.10)."""
    torch.addmm(out, a, b, out_dtype=torch.float32, out=out)


def _fp32_out_supported(device: torch.device, dtype: torch.dtype, accumulate: bool) -> bool:
    """Whether ``_addmm_fp32`` (``accumulate``) or ``_mm_fp32`` runs on ``dtype`` operands on ``device`` and gives
    the fp32 result; probed once per device, dtype and kind."""
    key = (device.type, device.index, dtype, accumulate)
    if key not in _FP32_OUT_SUPPORT:
        # 1 + 2^-7 is a bf16 and fp16 value whose square needs more significant bits than either has.
        a = torch.full((2, 2), 1.0 + 2.0 ** -7, dtype=dtype, device=device)
        expected = 2.0 * (1.0 + 2.0 ** -7) ** 2 + (1.0 if accumulate else 0.0)
        try:
            out = torch.ones(2, 2, dtype=torch.float32, device=device)
            (_addmm_fp32 if accumulate else _mm_fp32)(out, a, a)
            _FP32_OUT_SUPPORT[key] = bool((out == expected).all())
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_SUPPORT[key] = False
    return _FP32_OUT_SUPPORT[key]


def matmul_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool = False) -> Tensor:
    """``out = a @ b`` (or ``out += a @ b``) with products accumulated in fp32 (float64 for float64 operands).

    ``a`` and ``b`` share a dtype; ``out`` is 2-D and may be a strided view. With ``accumulate`` ``out`` must be
    fp32 or float64 (the running sum is never rounded to 16 bits). Every fp32 product runs at IEEE precision
    (:func:`ieee_fp32_matmul`).
    """
    if accumulate and not _wide(out.dtype):
        raise TypeError(f"matmul_into(accumulate=True) needs an fp32/float64 output, got {out.dtype}")
    if a.dtype == torch.float64:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    with ieee_fp32_matmul():
        return _matmul_fp32_policy(out, a, b, accumulate)


def _matmul_fp32_policy(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> Tensor:
    if a.dtype == out.dtype == torch.float32:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if out.dtype == a.dtype and not accumulate:
        return torch.mm(a, b, out=out)  # fp32 accumulation, one rounding to the output dtype
    if out.dtype == torch.float32:  # the probe answers False on the CPU
        if _fp32_out_supported(a.device, a.dtype, accumulate):
            (_addmm_fp32 if accumulate else _mm_fp32)(out, a, b)
            return out
        if accumulate and _fp32_out_supported(a.device, a.dtype, False):
            return _accumulate_row_blocks(out, a, b)
    return _blocked_upcast_matmul(out, a, b, accumulate)


def _accumulate_row_blocks(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out += a @ b`` through ``_mm_fp32`` into one fp32 scratch block of at most ``BLOCK_ELEMENTS``."""
    m, n = out.shape
    step = max(1, min(m, BLOCK_ELEMENTS // max(1, n)))
    scratch = torch.empty((step, n), dtype=out.dtype, device=out.device)
    for m0 in range(0, m, step):
        rows = out[m0:m0 + step]
        part = scratch[: rows.shape[0]]
        _mm_fp32(part, a[m0:m0 + step], b)
        rows += part
    return out


def _upcast(scratch: Tensor, x: Tensor) -> Tensor:
    """``x`` in the scratch block's (wide) dtype: ``x`` itself when it already has it, else copied into it."""
    return x if x.dtype == scratch.dtype else scratch.copy_(x)


def _blocked_upcast_matmul(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> Tensor:
    """16-bit operands upcast in blocks along the largest of (rows of a, columns of b, the reduction), each block
    copied into one reused wide scratch block."""
    wide = torch.float64 if out.dtype == torch.float64 else torch.float32
    m, k = a.shape
    n = b.shape[1]
    if k >= max(m, n):  # block the reduction: partial products summed in a wide [m, n] accumulator
        acc = out if accumulate else torch.zeros((m, n), dtype=wide, device=out.device)
        step = max(1, min(k, BLOCK_ELEMENTS // max(1, max(m, n))))
        a_buf = torch.empty((m, step), dtype=wide, device=out.device)
        b_buf = torch.empty((step, n), dtype=wide, device=out.device)
        for k0 in range(0, k, step):
            width = min(step, k - k0)
            acc.addmm_(_upcast(a_buf[:, :width], a[:, k0:k0 + width]), _upcast(b_buf[:width], b[k0:k0 + width]))
        if acc is not out:
            out.copy_(acc)
        return out
    step = max(1, BLOCK_ELEMENTS // max(1, k))
    if n >= m:  # block the columns of b (and of out)
        a_wide = a.to(wide)
        step = min(step, n)
        b_buf = torch.empty((k, step), dtype=wide, device=out.device)
        for n0 in range(0, n, step):
            width = min(step, n - n0)
            _product_into(out[:, n0:n0 + width], a_wide, _upcast(b_buf[:, :width], b[:, n0:n0 + width]), accumulate)
        return out
    b_wide = b.to(wide)
    step = min(step, m)
    a_buf = torch.empty((step, k), dtype=wide, device=out.device)
    for m0 in range(0, m, step):
        rows = min(step, m - m0)
        _product_into(out[m0:m0 + rows], _upcast(a_buf[:rows], a[m0:m0 + rows]), b_wide, accumulate)
    return out


def _product_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    if accumulate:
        out.addmm_(a, b)
    elif out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)
