"""Log-prob and entropy of the distribution a top-k then top-p sampler draws from (docs/statistics.md).

The support, as vLLM (``apply_top_k_top_p``, ``apply_top_k_only``) and Hugging Face (``TopKLogitsWarper``,
``TopPLogitsWarper``) cut it:

- **top-k** keeps every logit ``>=`` the k-th largest: ``c >= k`` tokens, all the ties at the k-th value included
  (both mask only ``logits < kth``). With bf16 logits such ties are common, and a token the sampler drew from them
  must not get ``-inf`` here.
- **top-p**, with the probabilities renormalised over those ``c``, keeps the smallest prefix, most probable first,
  whose mass reaches ``top_p``: token r stays iff the mass before it is ``< top_p`` (the samplers' ``cumsum of the
  ascending order <= 1 - p`` removed), and at least one token stays. Within a block of equal logits the samplers'
  order is their sort's (unspecified); here the lower token id ranks first. Where the mass before a token equals
  ``top_p`` exactly, rounding decides, here (float64) as in the samplers (their own precision).

On the support ``S`` the sampler draws ``p'_i = p_i / P(S)``: ``logprob' = log p_y - log P(S)`` if ``y`` is in S
(else ``-inf``) and ``entropy' = -sum_S p'_i log p'_i``. The support is a piecewise-constant function of the logits,
so the gradient is the softmax gradient over ``S``.

How, without ``[N, V]`` probabilities: ``top_k_ids`` gives k ids per row (ties to the lower id). The ``e`` further
tokens tied with the k-th value (higher ids) all carry that same value ``v``, so they enter as one term of
multiplicity ``n`` (the ones top-p keeps: a closed form, below), ``n exp(v / T)``. Their gradient is the same for
each of them; :class:`_Ties` hands each its share, ``1/n`` of the term's, recomputing which logits they are row
chunk by row chunk (the same chunks, so the same fp32 logits on the fused-linear path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sirl_kernels._checks import check_label_tensor, check_linear_args, check_logits_args, dense_rows
from sirl_kernels.topk import MAX_K, GatheredLogits, LinearLogitChunks, LogitChunks, check_k, top_k_and_ties


def _check_sampler(top_k: int, top_p: float, vocab: int) -> tuple[int, float]:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k == 0:
        raise ValueError("top_k=0 (no top-k cut) is not supported here: the support is then found by sorting the "
                         f"whole vocabulary; pass top_k <= {MAX_K} (vLLM and HF apply top_k before top_p)")
    return check_k(top_k, vocab, "top_k"), float(top_p)


def _tie_value(x: Tensor, ids: Tensor) -> Tensor:
    """``[n, 1]``: each row's k-th largest logit, the value of its further ties (``ids``: its top-k ids)."""
    return x.gather(1, ids[:, -1:])


def _support_ids(source, k: int, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids [N, k], ties [N], label_rank [N])``: the top-k ids (ties to the lower id), how many further tokens
    tie with the k-th value (0 where it is -inf: zero mass, in or out changes nothing; or NaN), and the label's
    rank among those (``-1``: the label is not one of them), in one pass over the row chunks. The further ties have
    higher ids than every tied id the k hold, so the label's rank is the count of ties below it minus those."""
    n, dev = source.rows, labels.device
    ids = torch.empty((n, k), dtype=torch.int64, device=dev)
    ties = torch.zeros(n, dtype=torch.int64, device=dev)
    rank = torch.full((n,), -1, dtype=torch.int64, device=dev)
    for s, e, x in source.chunks():
        ids[s:e], further = top_k_and_ties(x, k)
        v = _tie_value(x, ids[s:e])
        further = torch.where(v[:, 0] > -math.inf, further, torch.zeros_like(further))
        ties[s:e] = further
        y = labels[s:e]
        safe = y.clamp(0, source.vocab - 1)
        is_tie = (further > 0) & (y >= 0) & (y < source.vocab) & (x.gather(1, safe[:, None]) == v)[:, 0] \
            & ~(ids[s:e] == y[:, None]).any(-1)
        rows = is_tie.nonzero().squeeze(1)
        if rows.numel():  # few rows: a label among the further ties
            tied = x[rows] == v[rows]
            below = torch.arange(source.vocab, device=dev)[None, :] < safe[rows, None]
            held = (x.gather(1, ids[s:e])[rows] == v[rows]).sum(-1)  # the tied ones the k ids hold
            rank[s + rows] = (tied & below).sum(-1) - held
    return ids, ties, rank


class _Ties(torch.autograd.Function):
    """The value ``v`` of each row's kept further ties as a function of those logits: forward returns ``value``
    (detached); backward gives each of the row's ``kept`` first further ties (lowest ids first) ``grad / kept``."""

    @staticmethod
    def forward(ctx, value, kept, ties, ids, source, *tensors):
        ctx.source, ctx.kept, ctx.ties, ctx.ids = source, kept, ties, ids
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        source, kept, ids = ctx.source, ctx.kept, ctx.ids
        share = torch.where(kept > 0, grad / kept.clamp_min(1).to(grad.dtype), torch.zeros_like(grad))
        need = share != 0
        if not bool(need.any()):
            return (None,) * (5 + len(source.tensors()))
        parts, found = [], torch.zeros_like(kept)
        for s, e, x in source.chunks(need):  # the forward's blocks: the same logits, bit for bit
            extra = (x == _tie_value(x, ids[s:e])).scatter(1, ids[s:e], False)  # higher ids than the k's ties
            extra &= need[s:e, None]
            found[s:e] = extra.sum(-1)
            first = extra & (extra.cumsum(-1) <= kept[s:e, None])  # the kept ones: lowest ids first
            parts.append((s, e, torch.where(first, share[s:e, None].to(x.dtype), torch.zeros_like(x))))
        lost = need & (found != ctx.ties)
        if bool(lost.any()):  # never a gradient silently spread over other tokens
            raise RuntimeError(f"sampler support: {int(lost.sum())} rows' logits were not formed again bit for bit "
                               "in the backward (their ties at the k-th value changed); the gradient is undefined")
        return (None, None, None, None, None, *source.gradients(parts))


def _finish(z_s: Tensor, z_y: Tensor, ids: Tensor, ties: Tensor, rank: Tensor, source, y: Tensor, top_p: float,
            temperature: float, ignore_index: int, shape) -> tuple[Tensor, Tensor]:
    """The restricted log-prob and entropy from the k gathered logits ``z_s`` (largest first, differentiable), the
    label's logit ``z_y`` (differentiable) and the further ties (:func:`_support_ids`)."""
    with torch.no_grad():  # which tokens: float64 masses, no gradient (piecewise constant)
        z = z_s.double() / temperature
        v = z[:, -1]
        extra_log_mass = torch.where(ties > 0, v + torch.log(ties.double()), torch.full_like(v, -math.inf))
        lse = torch.logsumexp(torch.cat([z, extra_log_mass[:, None]], 1), -1, keepdim=True)
        p = torch.exp(z - lse)
        mass = p.cumsum(-1)
        keep = (mass - p) < top_p if top_p < 1.0 else torch.ones_like(z, dtype=torch.bool)
        keep[:, 0] = True
        q = torch.exp(v - lse[:, 0])  # each further tie's probability
        if top_p < 1.0:  # the j-th further tie stays iff mass + (j - 1) q < top_p
            room = torch.ceil((top_p - mass[:, -1]) / q).nan_to_num(0.0, posinf=0.0, neginf=0.0)
            kept = torch.minimum(room.clamp_min(0).long(), ties)
        else:
            kept = ties
        kept = torch.where(keep[:, -1], kept, torch.zeros_like(kept))
        hit = (ids == y[:, None]) & keep
        slot = torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(y, -1))
        label_is_tie = (rank >= 0) & (rank < kept)
    t = _Ties.apply(z_s[:, -1], kept, ties, ids, source, *source.tensors()) / temperature
    zk = torch.where(keep, z_s / temperature, torch.full_like(z_s, -math.inf))
    tie_term = torch.where(kept > 0, t + torch.log(kept.clamp_min(1).to(t.dtype)), torch.full_like(t, -math.inf))
    lse_s = torch.logsumexp(torch.cat([zk, tie_term[:, None]], 1), -1)
    logp = zk - lse_s[:, None]
    live = keep & (logp > -math.inf)  # p log p -> 0 at p = 0 (a -inf logit among the k)
    plogp = torch.where(live, logp.exp() * torch.where(live, logp, torch.zeros_like(logp)), torch.zeros_like(logp))
    log_q = t - lse_s
    tie_plogp = torch.where(kept > 0, kept.to(t.dtype) * log_q.exp() * torch.where(kept > 0, log_q, 0.0), 0.0)
    entropy = -(plogp.sum(-1) + tie_plogp)
    lp = logp.gather(1, slot.clamp_min(0)[:, None]).squeeze(1)
    as_tie = torch.where(label_is_tie, z_y / temperature - lse_s, torch.full_like(lp, -math.inf))
    lp = torch.where(slot >= 0, lp, as_tie)
    nan_row = torch.isnan(z_s).any(-1)
    lp = torch.where(nan_row, torch.full_like(lp, math.nan), lp)
    entropy = torch.where(nan_row, torch.full_like(entropy, math.nan), entropy)
    ignored = y == ignore_index
    zero = torch.zeros_like(lp)
    return torch.where(ignored, zero, lp).view(shape), torch.where(ignored, zero, entropy).view(shape)


def sampler_logprobs_entropy(logits: Tensor, labels: Tensor, *, top_k: int, top_p: float = 1.0,
                             temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Log-prob of ``labels`` and entropy of the distribution a top-k then top-p sampler draws from at temperature
    ``temperature`` (module docstring), shaped like ``labels``; ``-inf`` log-prob for a label outside the support,
    0 for ``ignore_index``. Differentiable w.r.t. ``logits`` (the softmax gradient over the support)."""
    temperature, ignore_index = check_logits_args(logits, temperature, ignore_index)
    check_label_tensor(labels, logits.shape[:-1], logits.device)
    top_k, top_p = _check_sampler(top_k, top_p, logits.shape[-1])
    flat, y = dense_rows(logits), labels.reshape(-1).long()
    source = LogitChunks(flat)
    with torch.no_grad():
        ids, ties, rank = _support_ids(source, top_k, y)
    wide = torch.float64 if flat.dtype == torch.float64 else torch.float32
    z_s = flat.gather(1, ids).to(wide)  # differentiable: the gradient lands on the support's columns
    z_y = flat.gather(1, y.clamp(0, flat.shape[1] - 1)[:, None]).squeeze(1).to(wide)
    return _finish(z_s, z_y, ids, ties, rank, source, y, top_p, temperature, ignore_index, labels.shape)


def linear_sampler_logprobs_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, top_k: int,
                                    top_p: float = 1.0, bias: Tensor | None = None, temperature: float = 1.0,
                                    ignore_index: int = -100, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """:func:`sampler_logprobs_entropy` of ``hidden @ weight.T (+ bias)``: the support from the fp32 logits formed
    ``chunk_size`` rows at a time, its ``k`` logits per row (and the label's) re-formed in fp32 from the gathered
    ``weight`` rows (differentiable w.r.t. ``hidden``, ``weight`` and ``bias``)."""
    temperature, ignore_index = check_linear_args(hidden, weight, bias, temperature, ignore_index)
    check_label_tensor(labels, hidden.shape[:-1], hidden.device)
    top_k, top_p = _check_sampler(top_k, top_p, weight.shape[0])
    flat, y = dense_rows(hidden), labels.reshape(-1).long()
    source = LinearLogitChunks(flat, weight, bias, chunk_size)
    with torch.no_grad():
        ids, ties, rank = _support_ids(source, top_k, y)
    z_s = GatheredLogits.apply(flat, weight, bias, ids)
    z_y = GatheredLogits.apply(flat, weight, bias, y.clamp(0, weight.shape[0] - 1)[:, None]).squeeze(1)
    return _finish(z_s, z_y, ids, ties, rank, source, y, top_p, temperature, ignore_index, labels.shape)
