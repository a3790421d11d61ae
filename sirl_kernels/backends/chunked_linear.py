"""The one fused-linear driver of the backends whose kernels read materialised logits ("torch", "cpu", "cuda").

Tokens run in chunks of ``chunk_size`` rows through ONE reusable fp32 workspace of ``chunk_size x V`` logits.
A backend supplies only its two logits kernels (``logits_forward`` on a chunk -> row stats, and
``logits_backward`` with ``out=`` the chunk -> its gradient in place); everything else lives here, once.

Numeric policy (the same on every backend, Triton included):
- logits are formed with fp32 accumulation and enter the softmax in fp32, never rounded to bf16/fp16;
- the logits gradient is computed in fp32; it enters the ``dX`` and ``dW`` matmuls rounded to the input dtype
  (the tensor-core operand on a GPU), with fp32 accumulation; ``db`` sums the fp32 gradient;
- ``dW`` and ``db`` are accumulated in fp32 across chunks and returned in the parameters' dtype; ``dX`` is
  returned in the input dtype;
- a gradient that autograd does not need gets no buffer and no matmul (LoRA keeps lm_head frozen).
float64 inputs (the "torch" backend's gradcheck) run the same code in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sirl_kernels._checks import accumulation_dtype
from sirl_kernels.backends import fixed_order
from sirl_kernels.backends.contract import NeedsGrad
from sirl_kernels.backends.matmul import matmul_into
from sirl_kernels.backends.rows import Coefficients, Extras, LinearRows, RowOutputs

Workspace = Callable[[int, int, torch.dtype, torch.device], Tensor]


def default_workspace(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty((rows, vocab), dtype=dtype, device=device)


@dataclass(frozen=True)
class LogitsKernels:
    """What a backend lends the driver: its logits forward and backward (contract signatures) and, optionally,
    how to allocate the chunk workspace (the "cpu" backend asks for huge pages) and its batch-invariant logits
    product ``fixed_order_matmul(out, hidden, weight)`` (default: ``fixed_order.matmul_into``)."""

    forward: Callable[..., RowOutputs]
    backward: Callable[..., Tensor]
    workspace: Workspace = default_workspace
    fixed_order_matmul: Callable[[Tensor, Tensor, Tensor], Tensor] = fixed_order.matmul_into


def bind(forward, backward, workspace: Workspace = default_workspace,
         fixed_order_matmul: Callable[[Tensor, Tensor, Tensor], Tensor] = fixed_order.matmul_into):
    """``(linear_forward, linear_backward)`` with the contract's signatures, driving a backend's logits kernels."""
    kernels = LogitsKernels(forward, backward, workspace, fixed_order_matmul)
    return functools.partial(linear_forward, kernels), functools.partial(linear_backward, kernels)


def _chunks(n: int, chunk_size: int):
    step = max(1, min(int(chunk_size), n))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _logits_into(z: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, fixed_order_matmul=None) -> Tensor:
    if fixed_order_matmul is None:
        matmul_into(z, hidden, weight.t())
    else:
        fixed_order_matmul(z, hidden, weight)
    if bias is not None:
        z += bias  # promoted to z's fp32
    return z


def linear_forward(kernels: LogitsKernels, rows: LinearRows, chunk_size: int, extras: Extras | None = None,
                   batch_invariant: bool = False) -> RowOutputs:
    """``batch_invariant``: the backend's fixed-order product forms each chunk's logits (a row's logits then do
    not depend on the chunk), and its logits forward runs batch-invariant (contract.py)."""
    hidden, weight, bias = rows.hidden, rows.weight, rows.bias
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    logprobs = torch.empty(n, dtype=acc, device=hidden.device)
    entropy = torch.empty(n, dtype=acc, device=hidden.device)
    stats = torch.empty((n, 2), dtype=acc, device=hidden.device)
    if n == 0:
        return RowOutputs(logprobs, entropy, stats)
    buf = kernels.workspace(min(int(chunk_size), n), vocab, acc, hidden.device)
    for s, e in _chunks(n, chunk_size):
        z = _logits_into(buf[: e - s], hidden[s:e], weight, bias,
                         kernels.fixed_order_matmul if batch_invariant else None)
        more = {} if extras is None else {"extras": extras.rows(s, e)}  # views: the chunk's kernel fills them
        if batch_invariant:
            more["batch_invariant"] = True
        logprobs[s:e], entropy[s:e], stats[s:e] = kernels.forward(rows.rows(s, e).of_logits(z), **more)
    return RowOutputs(logprobs, entropy, stats)


def linear_backward(kernels: LogitsKernels, rows: LinearRows, stats: Tensor, coef: Coefficients, chunk_size: int,
                    needs_grad: NeedsGrad) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    hidden, weight, bias = rows.hidden, rows.weight, rows.bias
    need_hidden, need_weight, need_bias = needs_grad
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    if n > 0 and (need_hidden or need_weight or need_bias):
        chunk = min(int(chunk_size), n)
        buf = kernels.workspace(chunk, vocab, acc, hidden.device)
        # The matmul operand: the gradient rounded to the input dtype, in one buffer reused by every chunk (none
        # for fp32 inputs, whose operand is the gradient itself, and none when only the bias gradient is needed).
        rounded = (torch.empty((chunk, vocab), dtype=hidden.dtype, device=hidden.device)
                   if hidden.dtype != acc and (need_hidden or need_weight) else None)
        for s, e in _chunks(n, chunk_size):
            z = _logits_into(buf[: e - s], hidden[s:e], weight, bias)
            dz = kernels.backward(rows.rows(s, e).of_logits(z), stats[s:e], coef.rows(s, e), out=z)
            if need_bias:
                grad_bias += dz.sum(0)
            operand = dz if rounded is None else rounded[: e - s].copy_(dz)
            if need_hidden:
                matmul_into(grad_hidden[s:e], operand, weight)
            if need_weight:
                matmul_into(grad_weight, operand.t(), hidden[s:e], accumulate=True)
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
