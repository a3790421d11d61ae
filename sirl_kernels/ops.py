"""The torch.library custom ops: schemas, fake implementations, autograd, and dispatch to a backend.

The ops take flattened inputs (2-D logits or hidden states, 1-D labels) and a concrete backend name chosen by
the public API; they return ``(logprobs, entropy, stats)``, saving the ``[N, 2]`` row stats (max and log-sum,
see ``backends/contract.py``) and the entropy, never probabilities, for the backward op. Being opaque custom
ops with fake implementations, they trace under ``torch.compile(fullgraph=True)`` on every device, and the
backward ops are custom ops of their own so AOTAutograd can trace the backward graph as well.

``check_labels`` (default True) validates labels on the host before any kernel runs, which on CUDA costs one
synchronisation; with False nothing syncs and a bad label gives NaN for its row instead (see
``sirl_kernels.api``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sirl_kernels import backends
from sirl_kernels._sizes import aligned_row_stride
from sirl_kernels.backends.rows import Coefficients, LinearRows, Rows, logprob_entropy_coefficients
from sirl_kernels._checks import (
    accumulation_dtype,
    check_inplace_target,
    check_label_tensor,
    check_label_values,
    check_linear_args,
    check_logits_args,
    check_row_tensors,
    dense_rows,
    has_dense_rows,
)


def _fake_outputs(like: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(like.dtype)
    return like.new_empty(n, dtype=acc), like.new_empty(n, dtype=acc), like.new_empty((n, 2), dtype=acc)


# The ops are public (torch.ops.sirl_kernels.*), so each one checks its inputs as the API does, with the same
# errors: the API's users pay for the cheap checks twice, which is nothing next to a pass over [N, V].
def _logits_inputs(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, backend: str
                   ) -> tuple[Tensor, str]:
    """The checked logits (dense rows: a strided or overlapping view is copied) and the concrete backend."""
    check_logits_args(logits, temperature, ignore_index)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V] (the public function takes [..., V]), got {tuple(logits.shape)}")
    check_label_tensor(labels, logits.shape[:1], logits.device, exact_dtype=torch.int64)
    return dense_rows(logits), backends.resolve(backend, logits.device, logits.dtype)


def _linear_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                   ignore_index: int, backend: str, chunk_size: int) -> tuple[Tensor, Tensor, Tensor | None, str]:
    check_linear_args(hidden, weight, bias, temperature, ignore_index)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D] (the public function takes [..., D]), got {tuple(hidden.shape)}")
    check_label_tensor(labels, hidden.shape[:1], hidden.device, exact_dtype=torch.int64)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bias = bias if bias is None or bias.stride(0) == 1 else bias.contiguous()
    return dense_rows(hidden), dense_rows(weight), bias, backends.resolve(backend, hidden.device, hidden.dtype)


def _checked_coefficients(alpha: Tensor, beta: Tensor, lam: Tensor, stats: Tensor, rows: Tensor,
                          gamma: Tensor | None = None, delta: Tensor | None = None) -> Coefficients:
    """The backward form's coefficients (``backends/rows.py``), checked like every per-row input of a backward."""
    acc = accumulation_dtype(rows.dtype)
    coef = Coefficients(*(None if c is None else c.to(acc).contiguous() for c in (alpha, beta, lam, gamma, delta)))
    present = {k: v for k, v in coef._asdict().items() if v is not None}
    check_row_tensors(rows.shape[0], rows.device, acc, stats=stats, **present)
    return coef


def _backward_rows(grad_logprobs: Tensor, grad_entropy: Tensor, stats: Tensor, entropy: Tensor, rows: Tensor
                   ) -> Coefficients:
    """The backward ops' per-row inputs, checked (the public ops take them from anyone; kernels read them through
    raw pointers), as the coefficients of the backends' one backward form (``backends/rows.py``)."""
    acc = accumulation_dtype(rows.dtype)
    grad_logprobs, grad_entropy = grad_logprobs.to(acc), grad_entropy.to(acc)
    check_row_tensors(rows.shape[0], rows.device, acc, grad_logprobs=grad_logprobs, grad_entropy=grad_entropy,
                      stats=stats, entropy=entropy)
    return logprob_entropy_coefficients(grad_logprobs, grad_entropy, entropy)


# --------------------------------------------------------------------------------------------------------------
# token_logprobs_entropy: logits [N, V] -> logprobs, entropy [N], stats [N, 2]
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sirl_kernels::token_logprobs_entropy", mutates_args=())
def token_logprobs_entropy_op(
    logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, backend: str,
    inplace_backward: bool = False, check_labels: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    logits, backend = _logits_inputs(logits, labels, temperature, ignore_index, backend)
    if check_labels:
        check_label_values(labels, logits.shape[-1], ignore_index)
    return tuple(backends.get(backend).logits_forward(Rows(logits, labels, temperature, ignore_index)))


@token_logprobs_entropy_op.register_fake
def _(logits, labels, temperature, ignore_index, backend, inplace_backward=False, check_labels=True):
    return _fake_outputs(logits, logits.shape[0])


def _gradient_strides(logits: Tensor) -> tuple[int, int]:
    """Strides of the out-of-place logits gradient, the real op's and the fake's alike (torch.compile and opcheck
    compare them); ``logits`` as the op received them (a view without dense rows is computed from a contiguous copy).

    On a GPU the op allocates it, for every backend, with row r as far from 16-byte alignment as row r of the
    logits (``_sizes.aligned_row_stride``): aligned wherever the logits are, whatever V (a 151,665-wide view of a
    151,936-wide buffer gets rows padded to 151,672, so the kernels' stores are 16 bytes wide, not 2), and sharing
    their misalignment where they have none (a contiguous [N, 50257] tensor: the gradient is contiguous too, and
    the CUDA kernels' vector loop, which needs equally aligned input and output, still applies). On CPU it is the
    backend's own contiguous buffer (the CPU kernels' vector stores need no alignment, and the ``cpu`` backend's
    buffer is backed by transparent huge pages)."""
    vocab = logits.shape[1]
    if logits.device.type != "cuda":
        return vocab, 1
    like = logits.stride(0) if has_dense_rows(logits) else vocab
    return aligned_row_stride(vocab, logits.dtype, like), 1


def _fake_logits_gradient(logits: Tensor) -> Tensor:
    return torch.empty_strided(logits.shape, _gradient_strides(logits), dtype=logits.dtype, device=logits.device)


def _fake_linear_gradients(hidden, weight, bias, needs_hidden_grad, needs_weight_grad, needs_bias_grad):
    def grad_like(t, needed):
        return torch.empty_like(t) if needed and t is not None else hidden.new_empty(0)

    return grad_like(hidden, needs_hidden_grad), grad_like(weight, needs_weight_grad), grad_like(bias, needs_bias_grad)


@torch.library.custom_op("sirl_kernels::token_logprobs_entropy_backward", mutates_args=())
def token_logprobs_entropy_backward_op(
    grad_logprobs: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, entropy: Tensor,
    temperature: float, ignore_index: int, backend: str,
) -> Tensor:
    logits, backend = _logits_inputs(logits, labels, temperature, ignore_index, backend)
    coef = _backward_rows(grad_logprobs, grad_entropy, stats, entropy, logits)
    return token_stats_backward_op(*coef[:3], logits, labels, stats, temperature, ignore_index, backend)


@token_logprobs_entropy_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index, backend):
    return _fake_logits_gradient(logits)


@torch.library.custom_op("sirl_kernels::token_logprobs_entropy_backward_", mutates_args=("logits",))
def token_logprobs_entropy_backward_inplace_op(
    grad_logprobs: Tensor, grad_entropy: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, entropy: Tensor,
    temperature: float, ignore_index: int, backend: str,
) -> None:
    """Writes the gradient into ``logits`` itself (their values are destroyed); every backend supports it."""
    _, backend = _logits_inputs(logits, labels, temperature, ignore_index, backend)
    if not has_dense_rows(logits):
        raise ValueError("the in-place backward needs logits with unit stride along V and rows that do not overlap, "
                         f"got strides {logits.stride()} for shape {tuple(logits.shape)}")
    coef = _backward_rows(grad_logprobs, grad_entropy, stats, entropy, logits)
    backends.get(backend).logits_backward(Rows(logits, labels, temperature, ignore_index), stats, coef, out=logits)


@token_logprobs_entropy_backward_inplace_op.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index, backend):
    return None


def _logits_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, backend = inputs[:5]
    _, entropy, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, labels, stats, entropy)
    ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
    ctx.inplace_backward = bool(inputs[5]) if len(inputs) > 5 else False
    if ctx.inplace_backward:  # runs only when autograd records the call: the logits will receive a gradient
        check_inplace_target(logits)
        if not has_dense_rows(logits):
            raise ValueError("inplace_backward=True needs logits with unit stride along V and rows that do not "
                             f"overlap, got strides {logits.stride()} (the public function copies such views)")


def _logits_backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
    logits, labels, stats, entropy = ctx.saved_tensors
    args = (grad_logprobs, grad_entropy, logits, labels, stats, entropy, ctx.temperature, ctx.ignore_index,
            ctx.backend)
    if ctx.inplace_backward:
        token_logprobs_entropy_backward_inplace_op(*args)
        grad = logits  # now holds the gradient
    else:
        grad = token_logprobs_entropy_backward_op(*args)
    return grad, None, None, None, None, None, None


token_logprobs_entropy_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


# --------------------------------------------------------------------------------------------------------------
# linear_token_logprobs_entropy: hidden [N, D], weight [V, D], bias [V]? -> logprobs, entropy [N], stats [N, 2]
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sirl_kernels::linear_token_logprobs_entropy", mutates_args=())
def linear_token_logprobs_entropy_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float, ignore_index: int,
    backend: str, chunk_size: int, check_labels: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    hidden, weight, bias, backend = _linear_inputs(hidden, weight, bias, labels, temperature, ignore_index, backend,
                                                   chunk_size)
    if check_labels:
        check_label_values(labels, weight.shape[0], ignore_index)
    rows = LinearRows(hidden, weight, bias, labels, temperature, ignore_index)
    return tuple(backends.get(backend).linear_forward(rows, chunk_size))


@linear_token_logprobs_entropy_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, backend, chunk_size, check_labels=True):
    return _fake_outputs(hidden, hidden.shape[0])


@torch.library.custom_op("sirl_kernels::linear_token_logprobs_entropy_backward", mutates_args=())
def linear_token_logprobs_entropy_backward_op(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    labels: Tensor, stats: Tensor, entropy: Tensor, temperature: float, ignore_index: int, backend: str,
    chunk_size: int, needs_hidden_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Only the gradients asked for are computed; the others come back as empty ``[0]`` placeholders (custom ops
    cannot return None)."""
    hidden, weight, bias, backend = _linear_inputs(hidden, weight, bias, labels, temperature, ignore_index, backend,
                                                   chunk_size)
    coef = _backward_rows(grad_logprobs, grad_entropy, stats, entropy, hidden)
    return linear_token_stats_backward_op(*coef[:3], hidden, weight, bias, labels, stats, temperature, ignore_index,
                                          backend, chunk_size, needs_hidden_grad, needs_weight_grad, needs_bias_grad)


@linear_token_logprobs_entropy_backward_op.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature, ignore_index,
      backend, chunk_size, needs_hidden_grad, needs_weight_grad, needs_bias_grad):
    return _fake_linear_gradients(hidden, weight, bias, needs_hidden_grad, needs_weight_grad, needs_bias_grad)


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, backend, chunk_size = inputs[:8]
    _, entropy, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
    ctx.temperature, ctx.ignore_index, ctx.backend, ctx.chunk_size = temperature, ignore_index, backend, chunk_size


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
    hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = linear_token_logprobs_entropy_backward_op(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, ctx.temperature,
        ctx.ignore_index, ctx.backend, ctx.chunk_size, need_hidden, need_weight, need_bias,
    )
    # needs_input_grad is False for a None bias, so need_bias already implies a bias.
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None, None, None)


linear_token_logprobs_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# --------------------------------------------------------------------------------------------------------------
# The backward form with caller-chosen coefficients (``backends/rows.py``): what the vocabulary-parallel ops use,
# where a rank that does not own a row's label has lam = 0
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sirl_kernels::token_stats_backward", mutates_args=())
def token_stats_backward_op(
    alpha: Tensor, beta: Tensor, lam: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, temperature: float,
    ignore_index: int, backend: str, gamma: Tensor | None = None, delta: Tensor | None = None,
) -> Tensor:
    logits, backend = _logits_inputs(logits, labels, temperature, ignore_index, backend)
    coef = _checked_coefficients(alpha, beta, lam, stats, logits, gamma, delta)
    out = None
    if logits.device.type == "cuda":
        out = torch.empty_strided(logits.shape, _gradient_strides(logits), dtype=logits.dtype, device=logits.device)
    return backends.get(backend).logits_backward(Rows(logits, labels, temperature, ignore_index), stats, coef, out=out)


@token_stats_backward_op.register_fake
def _(alpha, beta, lam, logits, labels, stats, temperature, ignore_index, backend, gamma=None, delta=None):
    return _fake_logits_gradient(logits)


@torch.library.custom_op("sirl_kernels::linear_token_stats_backward", mutates_args=())
def linear_token_stats_backward_op(
    alpha: Tensor, beta: Tensor, lam: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    stats: Tensor, temperature: float, ignore_index: int, backend: str, chunk_size: int, needs_hidden_grad: bool,
    needs_weight_grad: bool, needs_bias_grad: bool, gamma: Tensor | None = None, delta: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """As ``linear_token_logprobs_entropy_backward`` (empty ``[0]`` placeholders for gradients not asked for)."""
    hidden, weight, bias, backend = _linear_inputs(hidden, weight, bias, labels, temperature, ignore_index, backend,
                                                   chunk_size)
    coef = _checked_coefficients(alpha, beta, lam, stats, hidden, gamma, delta)
    needs = (needs_hidden_grad, needs_weight_grad, needs_bias_grad and bias is not None)
    rows = LinearRows(hidden, weight, bias, labels, temperature, ignore_index)
    grads = backends.get(backend).linear_backward(rows, stats, coef, chunk_size, needs)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@linear_token_stats_backward_op.register_fake
def _(alpha, beta, lam, hidden, weight, bias, labels, stats, temperature, ignore_index, backend, chunk_size,
      needs_hidden_grad, needs_weight_grad, needs_bias_grad, gamma=None, delta=None):
    return _fake_linear_gradients(hidden, weight, bias, needs_hidden_grad, needs_weight_grad, needs_bias_grad)
