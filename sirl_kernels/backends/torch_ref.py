"""Backend "torch": chunked pure PyTorch, valid on any device.

The readable specification of the math and the fallback. Every chunk of rows is upcast to float32, so a
chunk of ``chunk x V`` fp32 values is the only vocabulary-sized memory it holds; backward recomputes the
chunk from the saved lse and entropy instead of saving probabilities.
"""

from __future__ import annotations

import torch

from sirl_kernels._checks import accumulation_dtype
from sirl_kernels._sizes import logits_chunk_rows


def unavailable_reason(device: torch.device | None) -> str | None:
    return None


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
    """z: fp32 [n, V] already divided by T. Returns logprobs, entropy, lse (fp32 [n])."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    p = logp.exp()
    # p * logp is 0 * -inf = NaN where z = -inf; those terms are 0.
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    entropy = entropy.clamp_min(0.0)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    logprobs = logp.gather(1, safe_labels[:, None]).squeeze(1)
    zero = torch.zeros_like(logprobs)
    return torch.where(valid, logprobs, zero), torch.where(valid, entropy, zero), lse


def _chunk_grad(z, labels, valid, lse, entropy, g_lp, g_h, inv_t):
    """Gradient of sum(g_lp * logprobs + g_h * entropy) w.r.t. the unscaled logits of a chunk (fp32)."""
    g_lp = torch.where(valid, g_lp, torch.zeros_like(g_lp))
    g_h = torch.where(valid, g_h, torch.zeros_like(g_h))
    logp = z - lse[:, None]
    p = logp.exp()
    ent_term = torch.where(p > 0, p * (logp + entropy[:, None]), torch.zeros_like(p))
    dz = -(g_lp[:, None] * p) - g_h[:, None] * ent_term
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
    # 1 - p_y as -expm1(log p_y) keeps the label gradient exact when p_y -> 1.
    logp_y = logp.gather(1, safe_labels)
    p_y = logp_y.exp()
    ent_y = torch.where(p_y > 0, p_y * (logp_y + entropy[:, None]), torch.zeros_like(p_y))
    label_grad = g_lp[:, None] * (-torch.expm1(logp_y)) - g_h[:, None] * ent_y
    dz.scatter_(1, safe_labels, label_grad)
    dz = torch.where(valid[:, None], dz, torch.zeros_like(dz))
    return dz * inv_t


def logits_forward(logits, labels, temperature, ignore_index):
    n, v = logits.shape
    inv_t = 1.0 / temperature
    acc = accumulation_dtype(logits.dtype)
    out = [torch.empty(n, dtype=acc, device=logits.device) for _ in range(3)]
    step = logits_chunk_rows(v)
    for s in range(0, n, step):
        e = min(s + step, n)
        lab = labels[s:e]
        z = logits[s:e].to(acc) * inv_t
        lp, h, lse = _chunk_forward(z, lab, lab != ignore_index)
        out[0][s:e], out[1][s:e], out[2][s:e] = lp, h, lse
    return tuple(out)


def logits_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    n, v = logits.shape
    inv_t = 1.0 / temperature
    acc = accumulation_dtype(logits.dtype)
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    step = logits_chunk_rows(v)
    for s in range(0, n, step):
        e = min(s + step, n)
        lab = labels[s:e]
        z = logits[s:e].to(acc) * inv_t
        grad[s:e] = _chunk_grad(
            z, lab, lab != ignore_index, lse[s:e], entropy[s:e], grad_logprobs[s:e], grad_entropy[s:e], inv_t
        )
    return grad


def _linear_chunk_logits(h, weight, bias, inv_t):
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    return z.to(accumulation_dtype(z.dtype)) * inv_t


def linear_forward(hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    n = hidden.shape[0]
    inv_t = 1.0 / temperature
    acc = accumulation_dtype(hidden.dtype)
    out = [torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3)]
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        lab = labels[s:e]
        z = _linear_chunk_logits(hidden[s:e], weight, bias, inv_t)
        lp, h, lse = _chunk_forward(z, lab, lab != ignore_index)
        out[0][s:e], out[1][s:e], out[2][s:e] = lp, h, lse
    return tuple(out)


def linear_backward(
    grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, chunk_size
):
    n = hidden.shape[0]
    inv_t = 1.0 / temperature
    grad_hidden = torch.empty_like(hidden)
    # The weight gradient sums over every chunk: accumulate in fp32 whatever the weight's dtype.
    acc = accumulation_dtype(weight.dtype)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        lab = labels[s:e]
        z = _linear_chunk_logits(hidden[s:e], weight, bias, inv_t)
        dz = _chunk_grad(
            z, lab, lab != ignore_index, lse[s:e], entropy[s:e], grad_logprobs[s:e], grad_entropy[s:e], inv_t
        )
        grad_hidden[s:e] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
        grad_weight.addmm_(dz.t(), hidden[s:e].to(acc))
        if grad_bias is not None:
            grad_bias += dz.sum(0)
    return (
        grad_hidden,
        grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
