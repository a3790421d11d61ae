"""Backend "torch": chunked pure PyTorch, valid on any device.

The readable specification of the math and the fallback. Every chunk of rows is upcast to float32 (float64
stays float64), so a chunk of ``chunk x V`` values is the only vocabulary-sized memory it holds; backward
recomputes the chunk from the saved row stats instead of saving probabilities.

Per row, with ``z = x / T`` and ``m = max z``: ``log_sum = log sum exp(z - m)``, ``log p = (z - m) - log_sum``,
``H = -sum p log p``. Subtracting the max first keeps every difference exact near the top of the row, so a
common offset of 1e6 costs nothing (``z - lse`` would lose ``ulp(lse)``). The fused-linear op is the shared
driver of ``chunked_linear`` over these two functions.
"""

from __future__ import annotations

import math

import torch

from sirl_kernels._checks import accumulation_dtype
from sirl_kernels._sizes import logits_chunk_rows
from sirl_kernels.backends import chunked_linear, fixed_order
from sirl_kernels.backends.rows import RowOutputs, Rows

name = "torch"
stats_units = "z"  # stats[:, 0] is the max of z = x / T (the contract's Backend.stats_units)


def unavailable_reason(device: torch.device | None) -> str | None:
    return None


def _label_masks(labels, vocab, ignore_index):
    """(valid: not ignored, in_range: a readable label, safe: labels clamped to a readable column)."""
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe = torch.where(valid & in_range, labels, torch.zeros_like(labels))
    return valid, in_range, safe


def _per_row(value, valid, in_range):
    """0 on ignored rows, NaN on rows whose label is out of range (they were not checked: never silently wrong)."""
    nan = torch.full_like(value, float("nan"))
    return torch.where(valid, torch.where(in_range, value, nan), torch.zeros_like(value))


def _chunk_forward(z, labels, ignore_index, extras=None):
    """z: [n, V] already divided by T, in the accumulation dtype. Returns logprobs, entropy, stats [n, 2] and fills
    ``extras`` (``rows.Extras`` of [n] outputs) when given."""
    m = z.amax(dim=-1)  # NaN anywhere gives NaN; an all -inf row gives -inf, then NaN below like log_softmax
    shifted = z - m[:, None]
    log_sum = torch.logsumexp(shifted, dim=-1)
    logp = shifted - log_sum[:, None]
    p = logp.exp()
    # p = 0 where z = -inf: those terms are 0, not 0 * -inf; a NaN p keeps the NaN.
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * logp).sum(-1)
    entropy = entropy.clamp_min(0.0)  # rounding can leave a few ulp below 0; NaN stays NaN
    valid, in_range, safe = _label_masks(labels, z.shape[-1], ignore_index)
    logprobs = logp.gather(1, safe[:, None]).squeeze(1)
    stats = torch.stack([m, log_sum], dim=1)
    if extras is not None and extras.self_certainty is not None:
        # KL(U || p) = log s - mean(z - m) - log V: +inf with a -inf logit (p has a zero there)
        sc = log_sum - shifted.mean(-1) - math.log(z.shape[-1])
        extras.self_certainty.copy_(_per_row(sc, valid, in_range))
    if extras is not None and extras.varentropy is not None:
        # Var_p[log p] = E_p[(log p + H)^2], p = 0 terms 0
        dev = torch.where(p == 0, torch.zeros_like(p), p * (logp + entropy[:, None]) ** 2).sum(-1)
        extras.varentropy.copy_(_per_row(dev, valid, in_range))
    return (_per_row(logprobs, valid, in_range), _per_row(entropy, valid, in_range),
            _per_row(stats, valid[:, None], in_range[:, None]))


def _chunk_grad(z, labels, ignore_index, stats, coef, inv_t):
    """The backward form of ``rows.py`` w.r.t. the unscaled logits of a chunk."""
    valid, in_range, safe = _label_masks(labels, z.shape[-1], ignore_index)
    alpha, beta, lam = (c[:, None] for c in coef[:3])
    gamma = 0.0 if coef.gamma is None else coef.gamma[:, None]
    delta = 0.0 if coef.delta is None else coef.delta[:, None]
    logp = (z - stats[:, :1]) - stats[:, 1:]
    p = logp.exp()
    dz = p * (alpha + beta * logp + gamma * logp * logp)
    dz = torch.where(p == 0, torch.zeros_like(dz), dz) + delta  # a -inf logit: delta, not 0 * -inf
    # The label's lam (1 - p_y) as -lam expm1(log p_y): exact when p_y -> 1.
    logp_y = logp.gather(1, safe[:, None])
    p_y = logp_y.exp()
    rest_y = torch.where(p_y == 0, torch.zeros_like(p_y),
                         p_y * (alpha + lam + beta * logp_y + gamma * logp_y * logp_y))
    dz.scatter_(1, safe[:, None], rest_y - lam * torch.expm1(logp_y) + delta)
    nan = torch.full_like(dz, float("nan"))
    dz = torch.where(valid[:, None], torch.where(in_range[:, None], dz, nan), torch.zeros_like(dz))
    return dz * inv_t


def logits_forward(rows: Rows, extras=None, batch_invariant=False) -> RowOutputs:
    """``batch_invariant``: each row alone (``fixed_order.row_by_row``: torch's reductions pick their strategy
    from the shape, so a row's sums otherwise depend on how many rows come with it)."""
    if batch_invariant:
        return fixed_order.row_by_row(logits_forward, rows, extras=extras)
    logits, labels, temperature, ignore_index = rows
    n, v = logits.shape
    inv_t = 1.0 / temperature
    acc = accumulation_dtype(logits.dtype)
    logprobs = torch.empty(n, dtype=acc, device=logits.device)
    entropy = torch.empty(n, dtype=acc, device=logits.device)
    stats = torch.empty((n, 2), dtype=acc, device=logits.device)
    step = logits_chunk_rows(v)
    for s in range(0, n, step):
        e = min(s + step, n)
        z = logits[s:e].to(acc) * inv_t
        part = None if extras is None else extras.rows(s, e)
        logprobs[s:e], entropy[s:e], stats[s:e] = _chunk_forward(z, labels[s:e], ignore_index, part)
    return RowOutputs(logprobs, entropy, stats)


def logits_backward(rows: Rows, stats, coef, out=None):
    logits, labels, temperature, ignore_index = rows
    n, v = logits.shape
    inv_t = 1.0 / temperature
    acc = accumulation_dtype(logits.dtype)
    if out is None:
        out = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    step = logits_chunk_rows(v)
    for s in range(0, n, step):
        e = min(s + step, n)
        z = logits[s:e].to(acc) * inv_t
        # Computed whole before it is written, so ``out`` may be ``logits`` itself.
        out[s:e] = _chunk_grad(z, labels[s:e], ignore_index, stats[s:e], coef.rows(s, e), inv_t)
    return out


linear_forward, linear_backward = chunked_linear.bind(logits_forward, logits_backward)
