"""Top-k tokens per row, and log-prob and entropy of the distribution a top-k / top-p sampler draws from.

``top_k_ids`` ranks the raw logits (``softmax(x / T)`` ranks the same way for any T > 0); ties go to the lower token
id, whatever the order ``torch.topk`` returns them in. It reads the logits in row chunks of at most ``chunk x V``
(the fused-linear variant forms each chunk's logits with one fp32-accumulated matmul, one more pass of the forward's
FLOPs); it is not yet a heap inside the kernels' own pass. The log-probs of the ids are K-label log-probs of
:func:`sirl_kernels.token_stats` (exact, differentiable).

The sampler's support (``docs/statistics.md``): keep the ``top_k`` largest logits, then, with the probabilities
renormalised over those, the smallest prefix (most probable first) whose mass reaches ``top_p`` (token r stays iff the
mass before it is ``< top_p``; at least one stays), as vLLM and Hugging Face apply them. On the support ``S`` the
sampler draws ``p'_i = p_i / P(S)``: ``logprob' = log p_y - log P(S)`` if ``y`` is in S (else ``-inf``) and
``entropy' = -sum_S p'_i log p'_i``. The support is a piecewise-constant function of the logits, so the gradient is
the softmax gradient over ``S``, computed here by autograd over the ``k`` gathered logits of each row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sirl_kernels.api import linear_token_stats, token_stats
from sirl_kernels._checks import check_label_tensor, check_linear_args, check_logits_args, dense_rows
from sirl_kernels._sizes import logits_chunk_rows
from sirl_kernels.backends.matmul import matmul_into
from sirl_kernels.statistics import gather_chunks

MAX_K = 1024


def _check_k(k, vocab: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, max(vocab, 1)):
        raise ValueError(f"{name} must be an int in [1, min({MAX_K}, V = {vocab})], got {k!r}")
    return k


def _top_k_of_chunk(x: Tensor, k: int) -> Tensor:
    """``[n, k]`` ids of the k largest of each row of ``x [n, V]``, largest first, ties to the lower id. NaN ranks
    above everything (a NaN row's statistics are NaN whatever is picked)."""
    x = torch.where(torch.isnan(x), torch.full_like(x, math.inf), x)
    values = torch.topk(x, k, dim=-1, sorted=True).values
    kth = values[:, -1:]
    above = x > kth
    ties = x == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the k-th value's ties fit, lowest ids first
    keep = above | (ties & (ties.cumsum(-1) <= room))
    ids = keep.nonzero()[:, 1].view(x.shape[0], k)  # ascending ids
    order = torch.sort(x.gather(1, ids), dim=-1, descending=True, stable=True).indices  # stable: lower id first
    return ids.gather(1, order)


@torch.no_grad()
def top_k_ids(logits: Tensor, k: int) -> Tensor:
    """``[..., k]`` int64 ids of the k largest logits of each row, largest first, ties to the lower id."""
    check_logits_args(logits, 1.0, -100)
    flat = dense_rows(logits)
    k = _check_k(k, flat.shape[-1])
    out = torch.empty((flat.shape[0], k), dtype=torch.int64, device=flat.device)
    step = logits_chunk_rows(flat.shape[-1])
    for s in range(0, flat.shape[0], step):
        out[s:s + step] = _top_k_of_chunk(flat[s:s + step].float(), k)
    return out.view(*logits.shape[:-1], k)


@torch.no_grad()
def linear_top_k_ids(hidden: Tensor, weight: Tensor, k: int, *, bias: Tensor | None = None,
                     chunk_size: int = 256) -> Tensor:
    """:func:`top_k_ids` of ``hidden @ weight.T (+ bias)``, formed ``chunk_size`` rows at a time in fp32."""
    check_linear_args(hidden, weight, bias, 1.0, -100)
    flat = dense_rows(hidden)
    k = _check_k(k, weight.shape[0])
    out = torch.empty((flat.shape[0], k), dtype=torch.int64, device=flat.device)
    wide = torch.float64 if flat.dtype == torch.float64 else torch.float32
    buf = torch.empty((min(chunk_size, flat.shape[0]), weight.shape[0]), dtype=wide, device=flat.device)
    for s in range(0, flat.shape[0], chunk_size):
        rows = flat[s:s + chunk_size]
        # fp32 accumulation without an fp32 copy of the whole weight (the fused-linear numeric policy)
        z = matmul_into(buf[: rows.shape[0]], rows, weight.t())
        if bias is not None:
            z += bias
        out[s:s + chunk_size] = _top_k_of_chunk(z, k)
    return out.view(*hidden.shape[:-1], k)


def support_mask(sorted_logits: Tensor, top_p: float, temperature: float) -> Tensor:
    """``[n, k]`` bool: which of each row's top-k logits (largest first) the top-p cut keeps."""
    if top_p >= 1.0:
        return torch.ones_like(sorted_logits, dtype=torch.bool)
    probs = torch.softmax(sorted_logits.double() / temperature, dim=-1)
    before = probs.cumsum(-1) - probs  # the mass of the more probable tokens
    keep = before < top_p
    keep[:, 0] = True
    return keep


def _restricted(z_s: Tensor, in_support: Tensor, label_slot: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log-prob of the label's slot (``-1``: not in the support) and entropy of ``softmax(z_s / T)`` over the
    support; differentiable in ``z_s`` (fp32 or float64)."""
    z = torch.where(in_support, z_s / temperature, torch.full_like(z_s, -math.inf))
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -torch.where(in_support, p * torch.where(in_support, logp, torch.zeros_like(logp)),
                           torch.zeros_like(p)).sum(-1)
    lp = logp.gather(1, label_slot.clamp_min(0)[:, None]).squeeze(1)
    lp = torch.where(label_slot >= 0, lp, torch.full_like(lp, -math.inf))
    return lp, entropy


def _check_sampler(top_k: int, top_p: float, vocab: int) -> tuple[int, float]:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k == 0:
        raise ValueError("top_k=0 (no top-k cut) is not supported here: the support is then found by sorting the "
                         f"whole vocabulary; pass top_k <= {MAX_K} (vLLM and HF apply top_k before top_p)")
    return _check_k(top_k, vocab, "top_k"), float(top_p)


def sampler_logprobs_entropy(logits: Tensor, labels: Tensor, *, top_k: int, top_p: float = 1.0,
                             temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Log-prob of ``labels`` and entropy of the distribution a top-k then top-p sampler draws from at temperature
    ``temperature`` (module docstring), shaped like ``labels``; ``-inf`` log-prob for a label outside the support,
    0 for ``ignore_index``. Differentiable w.r.t. ``logits`` (the softmax gradient over the support)."""
    temperature, ignore_index = check_logits_args(logits, temperature, ignore_index)
    check_label_tensor(labels, logits.shape[:-1], logits.device)
    top_k, top_p = _check_sampler(top_k, top_p, logits.shape[-1])
    flat, y = dense_rows(logits), labels.reshape(-1).long()
    ids = top_k_ids(flat, top_k)
    z_s = flat.gather(1, ids)  # differentiable: the gradient lands on the support's columns
    return _finish_sampler(z_s.float() if flat.dtype != torch.float64 else z_s, ids, y, top_p, temperature,
                           ignore_index, labels.shape)


def linear_sampler_logprobs_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, top_k: int,
                                    top_p: float = 1.0, bias: Tensor | None = None, temperature: float = 1.0,
                                    ignore_index: int = -100, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """:func:`sampler_logprobs_entropy` of ``hidden @ weight.T (+ bias)``: the support from
    :func:`linear_top_k_ids`, its ``k`` logits per row re-formed in fp32 from the gathered ``weight`` rows
    (differentiable w.r.t. ``hidden``, ``weight`` and ``bias``)."""
    temperature, ignore_index = check_linear_args(hidden, weight, bias, temperature, ignore_index)
    check_label_tensor(labels, hidden.shape[:-1], hidden.device)
    top_k, top_p = _check_sampler(top_k, top_p, weight.shape[0])
    flat, y = dense_rows(hidden), labels.reshape(-1).long()
    ids = linear_top_k_ids(flat, weight, top_k, bias=bias, chunk_size=chunk_size)
    z_s = _GatheredLogits.apply(flat, weight, bias, ids)
    return _finish_sampler(z_s, ids, y, top_p, temperature, ignore_index, labels.shape)


class _GatheredLogits(torch.autograd.Function):
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


def _finish_sampler(z_s, ids, y, top_p, temperature, ignore_index, shape):
    in_support = support_mask(z_s.detach(), top_p, temperature)
    hit = (ids == y[:, None]) & in_support
    slot = torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(y, -1))
    lp, entropy = _restricted(z_s, in_support, slot, temperature)
    ignored = y == ignore_index
    nan_row = torch.isnan(z_s).any(-1)
    lp = torch.where(nan_row, torch.full_like(lp, math.nan), lp)
    entropy = torch.where(nan_row, torch.full_like(entropy, math.nan), entropy)
    zero = torch.zeros_like(lp)
    return torch.where(ignored, zero, lp).view(shape), torch.where(ignored, zero, entropy).view(shape)


def top_k_logprobs(logits: Tensor, k: int, *, temperature: float = 1.0, backend: str = "auto"
                   ) -> tuple[Tensor, Tensor]:
    """``(ids, logprobs)``, ``[..., k]`` each: the k most probable tokens of ``softmax(logits / T)`` (ties to the
    lower id) and their log-probs, differentiable (K-label log-probs of :func:`sirl_kernels.token_stats`)."""
    ids = top_k_ids(logits, k)
    return ids, token_stats(logits, ids, want=("logprobs",), temperature=temperature, backend=backend).logprobs


@torch.no_grad()
def linear_top_k_confidence(hidden: Tensor, weight: Tensor, k: int, *, bias: Tensor | None = None,
                            temperature: float = 1.0, backend: str = "auto", chunk_size: int = 256) -> Tensor:
    """DeepConf's token confidence ``-(1/k) sum_j log p_(j)`` over the k most probable tokens of
    ``softmax((hidden @ weight.T + bias) / T)``, ``[...]`` fp32, not differentiable (a metric): high when the
    distribution is peaked."""
    return -linear_top_k_logprobs(hidden, weight, k, bias=bias, temperature=temperature, backend=backend,
                                  chunk_size=chunk_size)[1].mean(-1)


def linear_top_k_logprobs(hidden: Tensor, weight: Tensor, k: int, *, bias: Tensor | None = None,
                          temperature: float = 1.0, backend: str = "auto", chunk_size: int = 256
                          ) -> tuple[Tensor, Tensor]:
    """:func:`top_k_logprobs` of ``hidden @ weight.T (+ bias)``."""
    ids = linear_top_k_ids(hidden, weight, k, bias=bias, chunk_size=chunk_size)
    return ids, linear_token_stats(hidden, weight, ids, want=("logprobs",), bias=bias, temperature=temperature,
                                   backend=backend).logprobs
