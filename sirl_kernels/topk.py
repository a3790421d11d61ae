"""Top-k tokens per row and their log-probs; the blocks of logits they, and the sampler's support
(``sirl_kernels.sampler``), are read from.

``top_k_ids`` ranks the raw logits (``softmax(x / T)`` ranks the same way for any T > 0); ties go to the lower token
id, whatever the order ``torch.topk`` returns them in. It reads the logits in row chunks of at most ``chunk x V``
(the fused-linear variant forms each chunk's logits with one fp32-accumulated matmul, one more pass of the forward's
FLOPs); it is not a heap inside the kernels' own pass (docs/statistics.md says why). The log-probs of the ids are
K-label log-probs of :func:`sirl_kernels.token_stats` (exact, differentiable).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sirl_kernels.api import linear_token_stats, token_stats
from sirl_kernels._checks import check_bool, check_linear_args, check_logits_args, dense_rows
from sirl_kernels._sizes import logits_chunk_rows
from sirl_kernels.backends import fixed_order
from sirl_kernels.backends.matmul import matmul_into
from sirl_kernels.statistics import gather_chunks

MAX_K = 1024


def check_k(k, vocab: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, max(vocab, 1)):
        raise ValueError(f"{name} must be an int in [1, min({MAX_K}, V = {vocab})], got {k!r}")
    return k


def top_k_and_ties(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(ids [n, k], further [n])`` of the rows of ``x [n, V]``: the ids of the k largest, largest first, ties to
    the lower id; and how many further logits of the row equal its k-th largest (higher ids than the tied ones
    kept). NaN ranks above everything, as in ``torch.topk`` (a NaN row's statistics are NaN whatever is picked).

    ``torch.topk`` of k + 1 finds the rows where ties straddle the k-th place (the (k+1)-th equals the k-th); only
    those rows are read again, to keep the lowest ids among the tied (``torch.topk`` keeps some of them)."""
    n, vocab = x.shape
    values, ids = torch.topk(x, min(k + 1, vocab), dim=-1, sorted=True)
    kth = values[:, k - 1]
    straddle = values[:, k] == kth if vocab > k else torch.zeros(n, dtype=torch.bool, device=x.device)
    values, ids = values[:, :k], ids[:, :k]
    further = torch.zeros(n, dtype=torch.int64, device=x.device)
    rows = straddle.nonzero().squeeze(1)
    if rows.numel():
        v = kth[rows, None]
        tied = x[rows] == v
        # the tied ones that fit, lowest ids first: k minus those ranked above the k-th value (NaN ranks above all)
        room = k - ((values[rows] > v) | torch.isnan(values[rows])).sum(-1, keepdim=True)
        cols = torch.arange(vocab, device=x.device)
        lowest = torch.topk(torch.where(tied, cols, vocab), k, dim=-1, largest=False, sorted=True).values
        j = torch.arange(k, device=x.device)[None, :]
        first_tie = k - room  # the ids above the k-th value come first in torch.topk's sorted output
        ids[rows] = torch.where(j < first_tie, ids[rows], lowest.gather(1, (j - first_tie).clamp_min(0)))
        further[rows] = tied.view(torch.uint8).sum(-1, dtype=torch.int32).long() - room[:, 0]  # a bool sum is slower
    # largest first, equal values by id: sort the ids, then a stable sort by value
    ids = ids.sort(-1).values
    order = torch.sort(x.gather(1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(1, order), further


def top_k_of_chunk(x: Tensor, k: int) -> Tensor:
    """``[n, k]`` ids of the k largest of each row of ``x [n, V]``, largest first, ties to the lower id
    (:func:`top_k_and_ties`)."""
    return top_k_and_ties(x, k)[0]


class LogitChunks:
    """The logits themselves, a block of rows at a time (fp32; float64 for float64 logits)."""

    def __init__(self, flat: Tensor):
        self.flat, self.rows, self.vocab = flat, flat.shape[0], flat.shape[1]
        self.step = logits_chunk_rows(self.vocab)

    def chunks(self, need: Tensor | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, end, logits)`` of each block of rows (only the blocks holding a row ``need`` marks)."""
        wide = torch.float64 if self.flat.dtype == torch.float64 else torch.float32
        for s in range(0, self.rows, self.step):
            e = min(s + self.step, self.rows)
            if need is None or bool(need[s:e].any()):
                yield s, e, self.flat[s:e].to(wide)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.flat,)

    def gradients(self, parts: list[tuple[int, int, Tensor]]) -> tuple[Tensor, ...]:
        """The logits' gradient from the ``(start, end, dz)`` of some blocks (zero elsewhere)."""
        grad = torch.zeros_like(self.flat)
        for s, e, g in parts:
            grad[s:e] = g.to(grad.dtype)
        return (grad,)


class LinearLogitChunks:
    """``hidden @ weight.T (+ bias)`` formed ``chunk`` rows at a time with fp32 accumulation (the fused-linear
    numeric policy, without an fp32 copy of the weight); the same blocks every time, so the same bits.
    ``fixed_order``: each logit summed over D in one fixed order (``fixed_order.matmul_into``), so a row's logits do
    not depend on the rows around it (slow: the batch-invariant mode)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: int, fixed_order: bool = False):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.rows, self.vocab, self.step = hidden.shape[0], weight.shape[0], max(1, int(chunk))
        self.fixed_order = fixed_order

    def chunks(self, need: Tensor | None = None) -> Iterator[tuple[int, int, Tensor]]:
        wide = torch.float64 if self.hidden.dtype == torch.float64 else torch.float32
        buf = torch.empty((min(self.step, self.rows), self.vocab), dtype=wide, device=self.hidden.device)
        for s in range(0, self.rows, self.step):
            rows = self.hidden[s:s + self.step]
            e = s + rows.shape[0]
            if need is not None and not bool(need[s:e].any()):
                continue
            if self.fixed_order:
                z = fixed_order.matmul_into(buf[: rows.shape[0]], rows, self.weight)
            else:
                z = matmul_into(buf[: rows.shape[0]], rows, self.weight.t())
            if self.bias is not None:
                z += self.bias
            yield s, e, z

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.hidden, self.weight) + (() if self.bias is None else (self.bias,))

    def gradients(self, parts: list[tuple[int, int, Tensor]]) -> tuple[Tensor, ...]:
        """``(d hidden, d weight[, d bias])`` of the blocks' ``dz`` through the product, fp32-accumulated."""
        acc = torch.float64 if self.hidden.dtype == torch.float64 else torch.float32
        d_h = torch.zeros(self.hidden.shape, dtype=acc, device=self.hidden.device)
        d_w = torch.zeros(self.weight.shape, dtype=acc, device=self.weight.device)
        d_b = None if self.bias is None else torch.zeros(self.bias.shape, dtype=acc, device=self.bias.device)
        for s, e, g in parts:
            operand = g.to(self.hidden.dtype)  # rounded to the input dtype, the fused linear's numeric policy
            matmul_into(d_h[s:e], operand, self.weight)
            matmul_into(d_w, operand.t(), self.hidden[s:e], accumulate=True)
            if d_b is not None:
                d_b += g.sum(0)
        grads = (d_h.to(self.hidden.dtype), d_w.to(self.weight.dtype))
        return grads + (() if d_b is None else (d_b.to(self.bias.dtype),))


def top_k_of_source(source, k: int) -> Tensor:
    """``[N, k]`` int64: :func:`top_k_of_chunk` of every block of ``source`` (``LogitChunks`` or
    ``LinearLogitChunks``)."""
    out = torch.empty((source.rows, k), dtype=torch.int64, device=source.tensors()[0].device)
    for s, e, x in source.chunks():
        out[s:e] = top_k_of_chunk(x, k)
    return out


@torch.no_grad()
def top_k_ids(logits: Tensor, k: int) -> Tensor:
    """``[..., k]`` int64 ids of the k largest logits of each row, largest first, ties to the lower id."""
    check_logits_args(logits, 1.0, -100)
    flat = dense_rows(logits)
    k = check_k(k, flat.shape[-1])
    return top_k_of_source(LogitChunks(flat), k).view(*logits.shape[:-1], k)


@torch.no_grad()
def linear_top_k_ids(hidden: Tensor, weight: Tensor, k: int, *, bias: Tensor | None = None,
                     chunk_size: int = 256, batch_invariant: bool = False) -> Tensor:
    """:func:`top_k_ids` of ``hidden @ weight.T (+ bias)``, formed ``chunk_size`` rows at a time in fp32
    (``batch_invariant``: each logit in one fixed order over D, so a row's ids do not depend on the batch)."""
    check_linear_args(hidden, weight, bias, 1.0, -100)
    flat = dense_rows(hidden)
    k = check_k(k, weight.shape[0])
    source = LinearLogitChunks(flat, weight, bias, chunk_size, fixed_order=check_bool("batch_invariant",
                                                                                       batch_invariant))
    return top_k_of_source(source, k).view(*hidden.shape[:-1], k)


class GatheredLogits(torch.autograd.Function):
    """``z[n, j] = hidden[n] . weight[ids[n, j]] (+ bias[ids[n, j]])`` in fp32 (float64 for float64), a block of
    rows at a time (``statistics.gather_chunks``: at most 8M gathered weight values), saving only the ids: no
    ``[N, k, D]`` gather exists, forward or backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z = torch.empty(ids.shape, dtype=acc, device=hidden.device)
        for rows in gather_chunks(ids.shape[0], ids.shape[1] * hidden.shape[1]):
            z[rows] = torch.einsum("nd,nkd->nk", hidden[rows].to(acc), weight[ids[rows]].to(acc))
        if bias is not None:
            z = z + bias[ids].to(acc)
        ctx.save_for_backward(hidden, weight, bias, ids)
        return z

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, ids = ctx.saved_tensors
        acc = grad.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_h = torch.empty_like(hidden) if need_h else None
        d_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for rows in gather_chunks(ids.shape[0], ids.shape[1] * hidden.shape[1]):
            if need_h:
                d_h[rows] = torch.einsum("nk,nkd->nd", grad[rows], weight[ids[rows]].to(acc)).to(hidden.dtype)
            if need_w:
                part = grad[rows][:, :, None] * hidden[rows].to(acc)[:, None, :]
                d_w.index_add_(0, ids[rows].reshape(-1), part.reshape(-1, hidden.shape[1]))
        d_b = None
        if need_b:
            d_b = torch.zeros(bias.shape, dtype=acc, device=bias.device).index_add_(
                0, ids.reshape(-1), grad.reshape(-1)).to(bias.dtype)
        return d_h, None if d_w is None else d_w.to(weight.dtype), d_b, None


def top_k_logprobs(logits: Tensor, k: int, *, temperature: float = 1.0, backend: str = "auto",
                   batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
    """``(ids, logprobs)``, ``[..., k]`` each: the k most probable tokens of ``softmax(logits / T)`` (ties to the
    lower id) and their log-probs, differentiable (K-label log-probs of :func:`sirl_kernels.token_stats`).
    ``batch_invariant``: as in ``token_stats`` (the ids, exact comparisons, are so already)."""
    ids = top_k_ids(logits, k)
    return ids, token_stats(logits, ids, want=("logprobs",), temperature=temperature, backend=backend,
                            batch_invariant=batch_invariant).logprobs


@torch.no_grad()
def linear_top_k_confidence(hidden: Tensor, weight: Tensor, k: int, *, bias: Tensor | None = None,
                            temperature: float = 1.0, backend: str = "auto", chunk_size: int = 256,
                            batch_invariant: bool = False) -> Tensor:
    """DeepConf's token confidence ``-(1/k) sum_j log p_(j)`` over the k most probable tokens of
    ``softmax((hidden @ weight.T + bias) / T)``, ``[...]`` fp32, not differentiable (a metric): high when the
    distribution is peaked."""
    return -linear_top_k_logprobs(hidden, weight, k, bias=bias, temperature=temperature, backend=backend,
                                  chunk_size=chunk_size, batch_invariant=batch_invariant)[1].mean(-1)


def linear_top_k_logprobs(hidden: Tensor, weight: Tensor, k: int, *, bias: Tensor | None = None,
                          temperature: float = 1.0, backend: str = "auto", chunk_size: int = 256,
                          batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`top_k_logprobs` of ``hidden @ weight.T (+ bias)`` (``batch_invariant``: the ids from fixed-order
    logits and the log-probs from ``linear_token_stats``'s batch-invariant mode)."""
    ids = linear_top_k_ids(hidden, weight, k, bias=bias, chunk_size=chunk_size, batch_invariant=batch_invariant)
    return ids, linear_token_stats(hidden, weight, ids, want=("logprobs",), bias=bias, temperature=temperature,
                                   backend=backend, batch_invariant=batch_invariant).logprobs
