"""float64 PyTorch references the kernels are tested against (never fp32 torch: its entropy is off by ~1e-5)."""

from __future__ import annotations

import torch


def reference_logprobs_entropy(logits, labels, temperature=1.0, ignore_index=-100):
    """float64 log_softmax(logits / T)[label] and entropy, with ignore_index positions set to 0."""
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    # H = lse - sum p z, with -inf entries (p = 0) left out so neither value nor gradient sees 0 * -inf.
    z_finite = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    entropy = torch.logsumexp(z, dim=-1) - (p * z_finite).sum(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels.long(), torch.zeros_like(labels.long()))
    logprobs = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(logprobs)
    return torch.where(valid, logprobs, zero), torch.where(valid, entropy, zero)


def reference_grads(logits, labels, grad_lp, grad_h, temperature=1.0, ignore_index=-100):
    """float64 autograd gradient of sum(grad_lp * logprobs + grad_h * entropy) w.r.t. logits."""
    x = logits.detach().double().requires_grad_(True)
    lp, h = reference_logprobs_entropy(x, labels, temperature, ignore_index)
    (lp * grad_lp.double() + h * grad_h.double()).sum().backward()
    return x.grad


def reference_linear(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return reference_logprobs_entropy(logits, labels, temperature, ignore_index)


def grad_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> dict:
    """Gradients come back in the input dtype: allow that dtype's rounding, relative to the largest entry."""
    scale = float(reference.abs().max()) if reference.numel() else 1.0
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-6 * max(scale, 1.0)}
    eps = torch.finfo(dtype).eps
    return {"rtol": 2 * eps, "atol": 2 * eps * max(scale, 1e-3)}
