"""One no-grad forward of the sampling policy: old log-probs and per-token entropy -> the SIRL reward.

SIRL's reward is the policy's own confidence: minus the mean entropy of its next-token distribution over the
tokens it generated, measured at the sampling temperature. Confident (low-entropy) answers score higher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sirl.rollout import Rollout
from sirl_kernels.hf import causal_lm_token_logprobs_entropy


def micro_batches(rollout: Rollout, token_budget: int, whole: int = 1) -> list[slice]:
    """Consecutive row slices with at most ``token_budget`` padded tokens each (at least ``whole`` rows, and a
    multiple of ``whole`` rows: ``whole=G`` keeps every group in one micro-batch)."""
    rows_per = max(whole, token_budget // max(1, rollout.input_ids.shape[1]) // whole * whole)
    return [slice(s, min(s + rows_per, len(rollout))) for s in range(0, len(rollout), rows_per)]


def trim(rollout: Rollout) -> Rollout:
    """Drops trailing columns no row uses (micro-batches of short completions run shorter)."""
    used = rollout.attention_mask.any(0).nonzero()
    end = int(used.max()) + 1 if used.numel() else rollout.input_ids.shape[1]
    return rollout.select(slice(None)) if end == rollout.input_ids.shape[1] else Rollout(
        rollout.input_ids[:, :end], rollout.attention_mask[:, :end], rollout.completion_mask[:, :end],
        rollout.truncated, rollout.prompt_index, rollout.prompt_length,
    )


@torch.no_grad()
def token_logprobs_entropy(model, rollout: Rollout, temperature: float, token_budget: int, check_labels: bool = True
                           ) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` ``[N, T]`` float32, zero outside the completion (alignment: sirl_kernels.hf).

    ``check_labels=False`` skips the kernels' per-call token-id check (a host sync per micro-batch on CUDA): for
    callers that validated the ids once (the trainer, once per rollout). The pass still syncs once per micro-batch
    in ``sirl_kernels.hf``, whose boolean-mask gather of the predicting rows needs their count on the host."""
    width = rollout.input_ids.shape[1]
    logprobs = torch.zeros(rollout.input_ids.shape, dtype=torch.float32, device=rollout.input_ids.device)
    entropy = torch.zeros_like(logprobs)
    was_training = model.training
    model.eval()  # no dropout and no gradient checkpointing in a no-grad pass
    try:
        for rows in micro_batches(rollout, token_budget):
            mb = trim(rollout.select(rows))
            lp, ent = causal_lm_token_logprobs_entropy(
                model, mb.input_ids, mb.attention_mask, mb.completion_mask, temperature=temperature,
                check_labels=check_labels,
            )
            logprobs[rows, : lp.shape[1]] = lp
            entropy[rows, : ent.shape[1]] = ent
    finally:
        model.train(was_training)
    assert logprobs.shape[1] == width
    return logprobs, entropy


def reward_mask(completion_mask: Tensor, last_k: int | None = None) -> Tensor:
    """The tokens whose entropy counts: all completion tokens, or only each row's last ``last_k`` of them."""
    mask = completion_mask.bool()
    if last_k is None:
        return mask
    from_end = mask.long().flip(-1).cumsum(-1).flip(-1)  # 1 on the last completion token, 2 before it, ...
    return mask & (from_end <= last_k)


def reward_options(
    aggregation: str = "mean", last_k: int | None = None, truncation: str = "keep", truncation_penalty: float = -10.0
) -> dict:
    """``sirl_rewards``' keyword options, each checked (and converted) by the rule of its ``SIRLConfig`` key, for
    callers that take them from their own configs: the TRL and verl integrations. Only these four keys are checked:
    a whole config's rules (files, device, evaluation) are no business of a reward."""
    from sirl.config import check_value

    return dict(aggregation=check_value("reward_aggregation", aggregation),
                last_k=check_value("reward_last_k", last_k),
                truncation=check_value("truncation", truncation),
                truncation_penalty=check_value("truncation_penalty", truncation_penalty))


def sirl_rewards(
    entropy: Tensor,
    completion_mask: Tensor,
    truncated: Tensor,
    *,
    aggregation: str = "mean",
    last_k: int | None = None,
    truncation: str = "keep",
    truncation_penalty: float = -10.0,
) -> tuple[Tensor, Tensor]:
    """Per-sequence SIRL reward and which sequences take part in the loss.

    Args:
        entropy: ``[N, T]`` per-token entropy (that of the distribution which produced token t).
        aggregation: "mean" (the paper) or "sum" of the entropies.
        truncation: completions that hit the length limit are kept as they are ("keep"), excluded from the loss
            and from their group's statistics ("mask"), or given the fixed reward ``truncation_penalty``.

    Returns:
        ``(rewards [N] float32, valid [N] bool)``.
    """
    mask = reward_mask(completion_mask, last_k).to(entropy.dtype)
    total = (entropy * mask).sum(-1)
    if aggregation == "mean":
        rewards = -total / mask.sum(-1).clamp_min(1.0)
    elif aggregation == "sum":
        rewards = -total
    else:
        raise ValueError(f"aggregation must be 'mean' or 'sum', got {aggregation!r}")
    valid = valid_rows(truncated, truncation)
    if truncation == "penalize":
        rewards = torch.where(truncated, torch.full_like(rewards, truncation_penalty), rewards)
    return rewards.float(), valid


def valid_rows(truncated: Tensor, truncation: str = "keep") -> Tensor:
    """``[N]`` bool: the sequences that take part in the loss and in their group's statistics (all of them, but
    the truncated ones under ``truncation="mask"``); known before any reward is."""
    if truncation not in ("keep", "mask", "penalize"):
        raise ValueError(f"truncation must be 'keep', 'mask' or 'penalize', got {truncation!r}")
    return ~truncated.bool() if truncation == "mask" else torch.ones_like(truncated, dtype=torch.bool)
