"""The clipped policy-gradient surrogate, its aggregation over tokens, and the KL anchor to the reference.

All functions are per-token and pure; the trainer sums micro-batch contributions with a normaliser computed
over the whole batch (all ranks), so accumulation and data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` and a clipped-token flag.

    ``advantages`` broadcasts against the ``[N, T]`` log-probs (pass ``[N, 1]`` for per-sequence advantages).
    The log-ratio is clamped before ``exp``: a token whose probability moved by e^20 is clipped anyway.
    """
    log_ratio = (new_logprobs - old_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    # Clipping is active (zero gradient) where the clipped branch is strictly the smaller one.
    is_clipped = clipped < unclipped
    return loss, is_clipped


def kl_penalty(new_logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3", clamp: float = 10.0) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    With ``d = log pi_ref - log pi`` (clamped to ``[-clamp, clamp]``): k1 = ``-d``, k2 = ``d^2 / 2``,
    k3 = ``exp(d) - d - 1`` (unbiased and never negative; the GRPO default).
    """
    d = (ref_logprobs - new_logprobs).clamp(-clamp, clamp)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return d.exp() - d - 1.0
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    total_tokens: float,
    total_sequences: float,
    max_completion_tokens: int,
) -> Tensor:
    """This micro-batch's share of the batch loss.

    - "token-mean" (DAPO, default): ``sum over all tokens / total_tokens``; every token weighs the same.
    - "seq-mean" (GRPO): mean over each sequence's tokens, then ``sum / total_sequences``.
    - "constant" (Dr. GRPO): ``sum over all tokens / (total_sequences * max_completion_tokens)``; no length bias.

    ``total_*`` count the whole batch over all micro-batches and ranks, so the shares add up to the batch loss.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        return (values * mask).sum() / max(total_tokens, 1.0)
    if mode == "seq-mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.sum() / max(total_sequences, 1.0)
    if mode == "constant":
        return (values * mask).sum() / max(total_sequences * max_completion_tokens, 1.0)
    raise ValueError(f"loss aggregation must be 'token-mean', 'seq-mean' or 'constant', got {mode!r}")


def sirl_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    log_ratio_clamp: float,
    kl_beta: float,
    kl_estimator: str,
    kl_clamp: float,
    aggregation: str,
    total_tokens: float,
    total_sequences: float,
    max_completion_tokens: int,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Surrogate + beta * KL for one micro-batch, aggregated; plus sums for logging (over this micro-batch, as 0-d
    tensors: reading each would be a host sync per micro-batch). ``is_weights`` (``[N, T]``, detached) scale each
    token's policy-gradient term, not the KL (truncated importance sampling against the rollout engine).

    A token whose old or new log-prob is ``-inf`` has probability 0 under the trainer's own distribution: with
    ``logprob_support=sampler``, a token the rollout engine drew from the edge of its top-k / top-p support that the
    trainer's logits (other kernels, other rounding) put just outside. It has no ratio (``-inf - -inf``); it leaves
    the loss and is counted (``outside_support``), so one such token cannot turn the batch's loss into NaN."""
    # elementwise, always: testing for such tokens first would be a host sync per micro-batch
    outside = torch.isneginf(old_logprobs) | torch.isneginf(new_logprobs)  # padding included: NaN * 0 is NaN
    zero = torch.zeros((), dtype=new_logprobs.dtype, device=new_logprobs.device)
    new_logprobs = torch.where(outside, zero, new_logprobs)  # no gradient reaches them either way
    old_logprobs = torch.where(outside, zero, old_logprobs)
    ref_logprobs = None if ref_logprobs is None else torch.where(outside, zero, ref_logprobs)
    counted_outside = (outside & loss_mask.bool()).sum()
    loss_mask = loss_mask.bool() & ~outside
    pg, is_clipped = clipped_surrogate(
        new_logprobs, old_logprobs, advantages[:, None], eps_low=eps_low, eps_high=eps_high,
        log_ratio_clamp=log_ratio_clamp,
    )
    if is_weights is not None:
        pg = pg * is_weights
    per_token = pg
    mask = loss_mask.bool()
    kl = None
    if ref_logprobs is not None and kl_beta != 0.0:
        kl = kl_penalty(new_logprobs, ref_logprobs, kl_estimator, kl_clamp)
        per_token = pg + kl_beta * kl
    norm = dict(total_tokens=total_tokens, total_sequences=total_sequences,
                max_completion_tokens=max_completion_tokens)
    loss = aggregate(per_token, mask, aggregation, **norm)
    with torch.no_grad():  # 0-d tensors, not floats: the caller sums them on the device and reads them once
        stats = {
            "tokens": mask.sum(),
            "outside_support": counted_outside,
            "clipped_tokens": (is_clipped & mask).sum(),
            "kl_sum": (kl * mask).sum() if kl is not None else loss.new_zeros(()),
            "loss": loss.detach(),
        }
    return loss, stats
