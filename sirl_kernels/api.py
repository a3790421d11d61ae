"""The public functions: validate, flatten, pick a backend, call the custom op, restore the shape."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from sirl_kernels import backends, ops
from sirl_kernels._checks import (
    INT_DTYPES,
    check_bool,
    check_ignore_index,
    check_label_tensor,
    check_label_values,
    check_linear_args,
    check_logits_args,
    dense_rows,
)
from sirl_kernels._sizes import default_linear_chunk_size


def token_logprobs_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    check_labels: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-position log-probability of the label and entropy of softmax(logits / temperature).

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16, any strides (a view whose rows are strided along V or
            overlap, e.g. ``expand``, is copied to dense rows first; float64 too, on the "torch" backend, which then
            also returns float64: that is what gradcheck needs).
        labels: ``[...]`` integer tensor; values in ``[0, V)`` or ``ignore_index``.
        temperature: divides the logits; T and 1/T must be normal float32 numbers (``TEMPERATURE_RANGE``,
            about [1.2e-38, 8.5e37]): every backend computes with them in fp32.
        ignore_index: positions with this label get 0 in both outputs and zero gradient.
        backend: "auto", "torch", "cpu", "triton" or "cuda" (``$SIRL_KERNELS_BACKEND`` overrides "auto").
        inplace_backward: backward writes the gradient into the logits' own storage instead of allocating an
            ``[N, V]`` gradient (every backend): **the logits' values are destroyed by backward** (they then
            hold their gradient), so nothing else may still need them. A logits tensor that had to be copied to
            unit stride or non-overlapping rows is copied first and left intact. Refused (RuntimeError) for a leaf
            that requires grad, or a view of one, as torch refuses in-place writes to them.
        check_labels: True (default) raises ``ValueError`` naming the first label outside ``[0, V)`` that is
            not ``ignore_index``; on CUDA that check synchronises with the host. False skips it, so the call
            never synchronises (CUDA-graph capture, no round trip per micro-batch): a bad label then gives NaN
            logprob and entropy for its row and a NaN gradient, never a read outside the row. Check the
            outputs with ``torch.isfinite`` (or call :func:`sirl_kernels.validate_labels` yourself) where you sync.

    Returns:
        ``(logprobs, entropy)``, float32 tensors shaped like ``labels``. Differentiable with respect to
        ``logits`` through either or both; the gradient has the logits' dtype. No ``[N, V]`` probability
        tensor is materialised.
    """
    temperature, ignore_index = check_logits_args(logits, temperature, ignore_index)
    check_label_tensor(labels, logits.shape[:-1], logits.device)
    inplace_backward = check_bool("inplace_backward", inplace_backward)
    check_labels = check_bool("check_labels", check_labels)
    name = backends.resolve(backend, logits.device, logits.dtype)

    flat = (dense_rows(logits), labels.reshape(-1).long(), temperature, ignore_index, name)
    if inplace_backward or not check_labels:
        logprobs, entropy, _ = ops.token_logprobs_entropy_op(*flat, inplace_backward, check_labels)
    else:  # the default path keeps the 5-argument call that torch.compile and opcheck see
        logprobs, entropy, _ = ops.token_logprobs_entropy_op(*flat)
    return logprobs.view(labels.shape), entropy.view(labels.shape)


def linear_token_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_labels: bool = True,
) -> tuple[Tensor, Tensor]:
    """``token_logprobs_entropy`` of ``logits = hidden @ weight.T (+ bias)`` without materialising the logits.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16.
        weight: ``[V, D]``, same dtype and device as ``hidden``.
        labels: ``[...]`` integer tensor; values in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``, same dtype.
        chunk_size: tokens per chunk; at most ``chunk_size x V`` fp32 logits (Triton: logits gradient values in
            the input dtype) exist at once. The default bounds that workspace to 256 MiB (432 tokens at
            V = 151,936; Triton: 1 GiB, 3,520 bf16 tokens).
        check_labels: as in :func:`token_logprobs_entropy`.

    Returns:
        ``(logprobs, entropy)`` as float32 tensors shaped like ``labels``, differentiable with respect to
        ``hidden``, ``weight`` and ``bias``. Logits are formed with fp32 accumulation and never rounded to the
        input dtype; the weight and bias gradients are accumulated in fp32 and only computed when required
        (a frozen ``lm_head`` costs no ``[V, D]`` buffer and no matmul).
    """
    temperature, ignore_index = check_linear_args(hidden, weight, bias, temperature, ignore_index)
    vocab = weight.shape[0]
    check_label_tensor(labels, hidden.shape[:-1], hidden.device)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_labels = check_bool("check_labels", check_labels)
    name = backends.resolve(backend, hidden.device, hidden.dtype)
    if chunk_size is None:
        chunk_size = default_linear_chunk_size(vocab, name, hidden.dtype)

    args = (
        dense_rows(hidden),
        dense_rows(weight),
        bias if bias is None or bias.stride(-1) == 1 else bias.contiguous(),
        labels.reshape(-1).long(),
        temperature,
        ignore_index,
        name,
        int(chunk_size),
    )
    if check_labels:
        logprobs, entropy, _ = ops.linear_token_logprobs_entropy_op(*args)
    else:
        logprobs, entropy, _ = ops.linear_token_logprobs_entropy_op(*args, False)
    return logprobs.view(labels.shape), entropy.view(labels.shape)


def validate_labels(labels: Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raises ``ValueError`` naming the first label outside ``[0, vocab_size)`` that is not ``ignore_index``.

    The check ``check_labels=True`` runs inside the ops; call it yourself where a synchronisation is already
    paid for when the ops run with ``check_labels=False``.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    check_label_values(labels.reshape(-1), int(vocab_size), check_ignore_index(ignore_index))
