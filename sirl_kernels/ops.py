"""The torch.library custom ops: schemas, fake implementations, autograd, and dispatch to a backend.

The ops take flattened inputs (2-D logits or hidden states, 1-D labels) and a concrete backend name chosen by
the public API; they return ``(logprobs, entropy, lse)``, saving lse and entropy (never probabilities) for
the backward op. Being opaque custom ops with fake implementations, they trace under
``torch.compile(fullgraph=True)`` on every device, and the backward ops are custom ops of their own so
AOTAutograd can trace the backward graph as well.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sirl_kernels import backends
from sirl_kernels._checks import accumulation_dtype, check_label_values


# --------------------------------------------------------------------------------------------------------------
# token_logprobs_entropy: logits [N, V] -> logprobs, entropy, lse [N]
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sirl_kernels::token_logprobs_entropy", mutates_args=())
def token_logprobs_entropy_op(
    logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, backend: str,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    check_label_values(labels, logits.shape[-1], ignore_index)
    return backends.get(backend).logits_forward(logits, labels, temperature, ignore_index)


@token_logprobs_entropy_op.register_fake
def _(logits, labels, temperature, ignore_index, backend, inplace_backward=False):
    n = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=accumulation_dtype(logits.dtype)) for _ in range(3))


@torch.library.custom_op("sirl_kernels::token_logprobs_entropy_backward", mutates_args=())
def token_logprobs_entropy_backward_op(
    grad_logprobs: Tensor,
    grad_entropy: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    acc = accumulation_dtype(logits.dtype)
    return backends.get(backend).logits_backward(
        grad_logprobs.to(acc), grad_entropy.to(acc), logits, labels, lse, entropy, temperature, ignore_index
    )


@token_logprobs_entropy_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("sirl_kernels::token_logprobs_entropy_backward_", mutates_args=("logits",))
def token_logprobs_entropy_backward_inplace_op(
    grad_logprobs: Tensor,
    grad_entropy: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> None:
    """Writes the gradient into ``logits`` itself (their values are destroyed). Only backends with a
    ``logits_backward_inplace`` function (Triton) implement it."""
    acc = accumulation_dtype(logits.dtype)
    backends.get(backend).logits_backward_inplace(
        grad_logprobs.to(acc), grad_entropy.to(acc), logits, labels, lse, entropy, temperature, ignore_index
    )


@token_logprobs_entropy_backward_inplace_op.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, backend):
    return None


def _logits_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, backend = inputs[:5]
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
    ctx.inplace_backward = bool(inputs[5]) if len(inputs) > 5 else False


def _logits_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    args = (grad_logprobs, grad_entropy, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index,
            ctx.backend)
    if ctx.inplace_backward:
        token_logprobs_entropy_backward_inplace_op(*args)
        grad = logits  # now holds the gradient
    else:
        grad = token_logprobs_entropy_backward_op(*args)
    return grad, None, None, None, None, None


token_logprobs_entropy_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


# --------------------------------------------------------------------------------------------------------------
# linear_token_logprobs_entropy: hidden [N, D], weight [V, D], bias [V]? -> logprobs, entropy, lse [N]
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sirl_kernels::linear_token_logprobs_entropy", mutates_args=())
def linear_token_logprobs_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    check_label_values(labels, weight.shape[0], ignore_index)
    return backends.get(backend).linear_forward(hidden, weight, bias, labels, temperature, ignore_index, chunk_size)


@linear_token_logprobs_entropy_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, backend, chunk_size):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=accumulation_dtype(hidden.dtype)) for _ in range(3))


@torch.library.custom_op("sirl_kernels::linear_token_logprobs_entropy_backward", mutates_args=())
def linear_token_logprobs_entropy_backward_op(
    grad_logprobs: Tensor,
    grad_entropy: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(hidden.dtype)
    grad_hidden, grad_weight, grad_bias = backends.get(backend).linear_backward(
        grad_logprobs.to(acc),
        grad_entropy.to(acc),
        hidden,
        weight,
        bias,
        labels,
        lse,
        entropy,
        temperature,
        ignore_index,
        chunk_size,
    )
    # Custom ops cannot return None; an empty tensor stands for "no bias".
    if grad_bias is None:
        grad_bias = weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


@linear_token_logprobs_entropy_backward_op.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, backend,
      chunk_size):
    grad_bias = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, backend, chunk_size = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.backend, ctx.chunk_size = temperature, ignore_index, backend, chunk_size


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = linear_token_logprobs_entropy_backward_op(
        grad_logprobs,
        grad_entropy,
        hidden,
        weight,
        bias,
        labels,
        lse,
        entropy,
        ctx.temperature,
        ctx.ignore_index,
        ctx.backend,
        ctx.chunk_size,
    )
    return grad_hidden, grad_weight, (None if bias is None else grad_bias), None, None, None, None, None


linear_token_logprobs_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
