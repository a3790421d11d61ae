"""The public functions: validate, flatten, pick a backend, call the custom op, restore the shape."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from sirl_kernels import backends, ops, statistics, vocab_parallel
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
    process_group=None,
    batch_invariant: bool = False,
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
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (tensor-parallel
            heads): this rank's ``logits [..., V_r]`` are the global columns that follow the lower ranks' ones, and
            ``labels`` are global ids, the same on every rank. One all_gather of 5 + K floats per row merges the ranks
            (``sirl_kernels.vocab_parallel``); the results are the global ones, the same bits on every rank, and
            the backward is local. Not with ``inplace_backward``.
        batch_invariant: every output of a row is bitwise the same whatever the number of rows, the rows
            around it and its position (no split, tile or reduction order chosen from the batch): train/rollout
            parity (vLLM's ``VLLM_BATCH_INVARIANT``). Its cost per backend is in the README. Gradients are
            unchanged (the logits gradient is elementwise given the row stats). Not with ``inplace_backward``.

    Returns:
        ``(logprobs, entropy)``, float32 tensors shaped like ``labels``. Differentiable with respect to
        ``logits`` through either or both; the gradient has the logits' dtype. No ``[N, V]`` probability
        tensor is materialised.
    """
    temperature, ignore_index = check_logits_args(logits, temperature, ignore_index)
    check_label_tensor(labels, logits.shape[:-1], logits.device)
    inplace_backward = check_bool("inplace_backward", inplace_backward)
    check_labels = check_bool("check_labels", check_labels)
    batch_invariant = check_bool("batch_invariant", batch_invariant)
    if process_group is not None:
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported with a process_group (vocabulary-parallel)")
        return vocab_parallel.token_logprobs_entropy(logits, labels, process_group=process_group,
                                                     temperature=temperature, ignore_index=ignore_index,
                                                     backend=backend, check_labels=check_labels,
                                                     batch_invariant=batch_invariant)
    if batch_invariant:
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported with batch_invariant=True")
        out = token_stats(logits, labels, temperature=temperature, ignore_index=ignore_index, backend=backend,
                          check_labels=check_labels, batch_invariant=True)
        return out.logprobs, out.entropy
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
    process_group=None,
    batch_invariant: bool = False,
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
        process_group: the vocabulary sharded over a ``torch.distributed`` group: ``weight [V_r, D]`` (and
            ``bias [V_r]``) are this rank's rows, after the lower ranks' ones; ``hidden`` and ``labels`` (global
            ids) are the same on every rank, and the gradient of ``hidden`` is summed over the group.
        batch_invariant: as in :func:`token_logprobs_entropy`, whatever ``chunk_size`` too: each logit is summed
            over D in an order fixed per row (never a GEMM whose blocking follows the number of rows).

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
    batch_invariant = check_bool("batch_invariant", batch_invariant)
    if process_group is not None or batch_invariant:
        out = linear_token_stats(hidden, weight, labels, bias=bias, temperature=temperature,
                                 ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                                 check_labels=check_labels, process_group=process_group,
                                 batch_invariant=batch_invariant)
        return out.logprobs, out.entropy
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


def token_stats(logits: Tensor, labels: Tensor, *, want=("logprobs", "entropy"), temperature: float = 1.0,
                ignore_index: int = -100, backend: str = "auto", check_labels: bool = True, process_group=None,
                batch_invariant: bool = False) -> statistics.TokenStats:
    """The statistics ``want`` names (``STATISTICS``) of ``softmax(logits / temperature)`` per position, in one pass,
    as a :class:`TokenStats`.

    Args:
        logits: ``[..., V]`` as in :func:`sirl_kernels.token_logprobs_entropy`.
        labels: ``[...]`` (one label per position) or ``[..., K]`` (K labels: ``logprobs`` is ``[..., K]``).
        want: names among ``logprobs``, ``entropy``, ``self_certainty`` (``KL(U || p) = lse - mean(z) - log V``,
            Intuitor's reward), ``varentropy`` (``Var_p[log p]``), ``lse`` (``log sum exp z``).
        process_group: the vocabulary sharded over a ``torch.distributed`` group, as in
            :func:`token_logprobs_entropy` (``sirl_kernels.vocab_parallel``).
    Every output is differentiable (any weighted combination has an exact backward); only the accumulators the
    request needs are kept. ``temperature``, ``ignore_index``, ``backend``, ``check_labels``, ``batch_invariant``:
    as in :func:`token_logprobs_entropy`; a row whose first label is ``ignore_index`` is ignored.
    """
    batch_invariant = check_bool("batch_invariant", batch_invariant)
    if process_group is not None:
        return vocab_parallel.token_stats(logits, labels, process_group=process_group, want=want,
                                          temperature=temperature, ignore_index=ignore_index, backend=backend,
                                          check_labels=check_labels, batch_invariant=batch_invariant)
    names = statistics.wanted(want)
    temperature, ignore_index = check_logits_args(logits, temperature, ignore_index)
    check_labels = check_bool("check_labels", check_labels)
    k_labels = labels.dim() == logits.dim()
    check_label_tensor(labels, logits.shape[:-1] + ((labels.shape[-1],) if k_labels else ()), logits.device)
    name = backends.resolve(backend, logits.device, logits.dtype)
    flat_labels = labels.reshape(-1, labels.shape[-1] if k_labels else 1).long()
    outputs = statistics.token_stats_op(dense_rows(logits), flat_labels, temperature, ignore_index, name,
                             "self_certainty" in names, "varentropy" in names, check_labels, batch_invariant)
    logprobs, entropy, _, lse, sc, ve = outputs
    values = dict(logprobs=logprobs, entropy=entropy, lse=lse, self_certainty=sc, varentropy=ve)
    return statistics.result(values, names, labels, k_labels)


def linear_token_stats(hidden: Tensor, weight: Tensor, labels: Tensor, *, want=("logprobs", "entropy"),
                       bias: Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                       backend: str = "auto", chunk_size: int | None = None, check_labels: bool = True,
                       process_group=None, batch_invariant: bool = False) -> statistics.TokenStats:
    """:func:`token_stats` of ``logits = hidden @ weight.T (+ bias)`` without materialising the logits (as
    :func:`linear_token_logprobs_entropy`, ``process_group`` included); ``labels`` ``[...]`` or ``[..., K]``."""
    batch_invariant = check_bool("batch_invariant", batch_invariant)
    if process_group is not None:
        return vocab_parallel.linear_token_stats(hidden, weight, labels, process_group=process_group, want=want,
                                                 bias=bias, temperature=temperature, ignore_index=ignore_index,
                                                 backend=backend, chunk_size=chunk_size, check_labels=check_labels,
                                                 batch_invariant=batch_invariant)
    names = statistics.wanted(want)
    temperature, ignore_index = check_linear_args(hidden, weight, bias, temperature, ignore_index)
    check_labels = check_bool("check_labels", check_labels)
    k_labels = labels.dim() == hidden.dim()
    check_label_tensor(labels, hidden.shape[:-1] + ((labels.shape[-1],) if k_labels else ()), hidden.device)
    name = backends.resolve(backend, hidden.device, hidden.dtype)
    if chunk_size is None:
        chunk_size = default_linear_chunk_size(weight.shape[0], name, hidden.dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    flat_labels = labels.reshape(-1, labels.shape[-1] if k_labels else 1).long()
    bias = bias if bias is None or bias.stride(-1) == 1 else bias.contiguous()
    outputs = statistics.linear_token_stats_op(dense_rows(hidden), dense_rows(weight), bias, flat_labels, temperature,
                                    ignore_index, name, chunk_size, "self_certainty" in names,
                                    "varentropy" in names, check_labels, batch_invariant)
    logprobs, entropy, _, lse, sc, ve = outputs
    values = dict(logprobs=logprobs, entropy=entropy, lse=lse, self_certainty=sc, varentropy=ve)
    return statistics.result(values, names, labels, k_labels)


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
