"""float64 references of every per-token statistic over the full logits, and the fp32 rounding bounds the tests of
sirl_kernels' statistics share (test_statistics, test_vocab_parallel): see test_statistics' docstring."""

from __future__ import annotations

import math

import torch


def reference(x, labels, temperature, v):
    """float64 statistics from the full logits; ignored rows 0."""
    z = x.double() / temperature
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    fin = torch.where(torch.isfinite(z), z, 0.0)
    lse = torch.logsumexp(z, -1)
    entropy = lse - (p * fin).sum(-1)
    lp = logp.gather(-1, labels.clamp_min(0)[..., None] if labels.dim() == z.dim() - 1 else labels.clamp_min(0))
    lp = lp.squeeze(-1) if labels.dim() == z.dim() - 1 else lp
    sc = lse - z.mean(-1) - math.log(v)
    ve = torch.where(p == 0, 0.0, p * (torch.where(p == 0, 0.0, logp) + entropy[..., None]) ** 2).sum(-1)
    lse = torch.where(torch.isneginf(z).all(-1), math.nan, lse)  # an all -inf row: NaN, like every statistic
    return dict(logprobs=lp, entropy=entropy, self_certainty=sc, varentropy=ve, lse=lse)


def tolerance(name, ref, x, temperature, dtype, v):
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    z = x.double() / temperature
    finite = torch.where(torch.isfinite(z), z, math.nan)
    top = finite.nan_to_num(nan=-math.inf).amax(-1, keepdim=True)
    spread = (top - finite).nan_to_num(nan=0.0).amax(-1)
    bound = math.log(v) + spread.clamp_max(1e3) + 1
    scale = finite.abs().nan_to_num(nan=0.0).amax(-1)
    if ref.dim() > bound.dim():
        bound, scale = bound[..., None], scale[..., None]
    if name == "varentropy":
        return 64 * eps * (ref.abs() + bound ** 2) + 4 * eps * scale * bound
    return 64 * eps * (ref.abs() + bound) + 4 * eps * scale
