"""Matrix products with fp32 accumulation whatever the operands' dtype, as the fused-linear numeric policy needs.

- CUDA: cuBLAS accumulates bf16/fp16 products in fp32; an fp32 *output* from 16-bit operands uses
  ``torch.mm(..., out_dtype=torch.float32)`` where this torch has it (probed once), else the operands are upcast
  block by block.
- CPU: torch has no fp32-output 16-bit matmul (``aten::mm.dtype`` is CUDA-only), so 16-bit operands are upcast
  to fp32 in blocks of at most ``BLOCK_ELEMENTS`` along the largest dimension and multiplied in fp32. Products of
  two bf16/fp16 values are exact in fp32, so this is the same arithmetic as a tensor-core GEMM with fp32
  accumulation (up to summation order), and never a copy of the whole weight.
- fp32 and float64 operands go straight to ``torch.mm`` / ``addmm_``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Upcast block: at most this many elements of an operand are held in fp32 at once (32 MiB).
BLOCK_ELEMENTS = 8 * 1024 * 1024

_OUT_DTYPE_SUPPORT: dict[str, bool] = {}


def _wide(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def _cuda_out_dtype_supported(device: torch.device) -> bool:
    """Whether ``torch.mm(a16, b16, out_dtype=torch.float32, out=...)`` runs here (probed once per device type)."""
    key = device.type
    if key not in _OUT_DTYPE_SUPPORT:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            out = torch.empty(2, 2, dtype=torch.float32, device=device)
            torch.mm(a, a, out_dtype=torch.float32, out=out)
            _OUT_DTYPE_SUPPORT[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_SUPPORT[key] = False
    return _OUT_DTYPE_SUPPORT[key]


def matmul_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool = False) -> Tensor:
    """``out = a @ b`` (or ``out += a @ b``) with products accumulated in fp32 (float64 for float64 operands).

    ``a`` and ``b`` share a dtype; ``out`` is 2-D and may be a strided view. With ``accumulate`` ``out`` must be
    fp32 or float64 (the running sum is never rounded to 16 bits).
    """
    if accumulate and not _wide(out.dtype):
        raise TypeError(f"matmul_into(accumulate=True) needs an fp32/float64 output, got {out.dtype}")
    if _wide(a.dtype) and a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if a.is_cuda:
        if out.dtype == a.dtype and not accumulate:
            return torch.mm(a, b, out=out)  # cuBLAS: fp32 accumulation, one rounding to the output dtype
        if out.dtype == torch.float32 and _cuda_out_dtype_supported(a.device):
            if accumulate:
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return _blocked_upcast_matmul(out, a, b, accumulate)


def _blocked_upcast_matmul(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> Tensor:
    """16-bit operands upcast in blocks along the largest of (rows of a, columns of b, the reduction)."""
    wide = torch.float64 if out.dtype == torch.float64 else torch.float32
    m, k = a.shape
    n = b.shape[1]
    if k >= max(m, n):  # block the reduction: partial products summed in an fp32 [m, n] accumulator
        acc = out if accumulate else torch.zeros((m, n), dtype=wide, device=out.device)
        step = max(1, BLOCK_ELEMENTS // max(1, max(m, n)))
        for k0 in range(0, k, step):
            acc.addmm_(a[:, k0:k0 + step].to(wide), b[k0:k0 + step].to(wide))
        if acc is not out:
            out.copy_(acc)
        return out
    if n >= m:  # block the columns of b (and of out)
        a_wide = a.to(wide)
        step = max(1, BLOCK_ELEMENTS // max(1, k))
        for n0 in range(0, n, step):
            _product_into(out[:, n0:n0 + step], a_wide, b[:, n0:n0 + step].to(wide), accumulate)
        return out
    b_wide = b.to(wide)
    step = max(1, BLOCK_ELEMENTS // max(1, k))
    for m0 in range(0, m, step):
        _product_into(out[m0:m0 + step], a[m0:m0 + step].to(wide), b_wide, accumulate)
    return out


def _product_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    if accumulate:
        out.addmm_(a, b)
    elif out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)
