"""Batch-invariant building blocks in plain PyTorch: results of a row that do not depend on the rows around it.

A GEMM's library picks its blocking, split-K and micro-kernel from the matrix shape, so a row's logits change with
the number of rows (MKL here: a row alone and the same row among 64 differ by 1e-5; with MKL's AVX2 kernels even
the rows of a fixed-shape ``[8, D]`` product differ by position), and a reduction's strategy changes with the
number of rows too (torch's CPU ``logsumexp`` of one 151,936-wide row splits it over threads; of 64 rows it does
not). The functions here avoid both, on any device:

- :func:`matmul_into` forms ``hidden @ weight.T`` as ``D`` rank-1 steps in the order ``d = 0, 1, ...``, each a
  separately rounded multiply and add over the whole tile (two elementwise ops, so no FMA contraction can differ
  between a vector body and a scalar tail): every logit is the same sequence of IEEE operations whatever the
  rows, their position or the chunk. It is slow (``2 D`` elementwise passes over the ``[rows, V]`` tile) and
  meant for the "torch" and "cuda" backends' ``batch_invariant=True``; the "cpu" backend has a fused C++ kernel
  with the same property, and Triton fixes its tiles.
- :func:`gathered_logits` the same for a few columns per row (the further labels of ``[N, K]`` labels), without
  an ``[N, K, D]`` gather.
- :func:`row_by_row` runs a per-row kernel on each row alone, copied into a fresh buffer, so the reduction
  strategy and the memory alignment it sees are those of a one-row input whatever N is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sirl_kernels._checks import accumulation_dtype
from sirl_kernels.backends.rows import RowOutputs, Rows


# Vocabulary columns per block of matmul_into: the block's transposed weight ([D, 4096] fp32: 16 KiB per unit of D)
# and the output block are reused D times, so they should stay in cache.
VOCAB_BLOCK = 4096


def matmul_into(out: Tensor, hidden: Tensor, weight: Tensor) -> Tensor:
    """``out[n, v] = sum_d hidden[n, d] * weight[v, d]`` summed in the order d = 0, 1, ... with one rounding per
    multiply and per add, in ``out``'s dtype (fp32, or float64). ``out``: ``[rows, V]``. The vocabulary runs in
    blocks of ``VOCAB_BLOCK`` columns (a block's order over d is the same whatever the blocking)."""
    acc = out.dtype
    columns = hidden.to(acc).t().contiguous()  # [D, rows]: hidden[:, d] contiguous
    for v0 in range(0, weight.shape[0], VOCAB_BLOCK):
        block = out[:, v0:v0 + VOCAB_BLOCK]
        w_t = weight[v0:v0 + VOCAB_BLOCK].to(acc).t().contiguous()  # [D, block]
        term = torch.empty_like(block)
        block.zero_()
        for d in range(w_t.shape[0]):
            torch.mul(columns[d, :, None], w_t[d, None, :], out=term)
            block.add_(term)
    return out


def gathered_logits(hidden: Tensor, weight: Tensor, columns: Tensor) -> Tensor:
    """``[N, K]`` logits ``hidden[n] . weight[columns[n, k]]`` in the order of :func:`matmul_into`, in the
    accumulation dtype; ``columns`` readable ids."""
    acc = accumulation_dtype(hidden.dtype)
    out = torch.zeros(columns.shape, dtype=acc, device=hidden.device)
    term = torch.empty_like(out)
    for d in range(hidden.shape[1]):
        torch.mul(hidden[:, d, None].to(acc), weight[:, d][columns].to(acc), out=term)
        out.add_(term)
    return out


def row_by_row(kernel: Callable[..., RowOutputs], rows: Rows, extras=None) -> RowOutputs:
    """``kernel(rows of one row, extras of that row)`` for each row alone, outputs stacked. Each row is copied into
    one fresh contiguous buffer first (the same address alignment for every row)."""
    n, vocab = rows.logits.shape
    buf = torch.empty((1, vocab), dtype=rows.logits.dtype, device=rows.logits.device)
    parts = []
    for r in range(n):
        buf.copy_(rows.logits[r:r + 1])
        one = rows.rows(r, r + 1)._replace(logits=buf)
        parts.append(kernel(one, None if extras is None else extras.rows(r, r + 1)))
    if not parts:
        return kernel(rows, extras)
    return RowOutputs(*(torch.cat(p) for p in zip(*parts)))
