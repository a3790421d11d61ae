"""Group-relative advantages (GRPO): how much better a sample is than its siblings from the same prompt."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: str = "group",
    min_std: float = 1e-4,
    valid: Tensor | None = None,
    batch_std: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """``A_i = (r_i - mean(group)) / max(std, min_std)``; rows of a group are contiguous.

    Args:
        rewards: ``[N]`` with ``N`` a multiple of ``group_size``.
        scale: "group" divides by the group's std (GRPO), "batch" by the std over the whole batch (pass
            ``batch_std`` when the batch spans ranks), "none" only centres (Dr. GRPO).
        min_std: floor on the divisor, so a group of equal rewards gets 0 advantage instead of NaN.
        valid: ``[N]`` bool; invalid rows (e.g. masked truncations) are left out of the statistics and get 0.

    Std is the unbiased sample std (``torch.std``), as in DeepSeek's GRPO and TRL.

    Returns:
        ``(advantages [N], group_std [N // group_size])``; the group std is worth logging: when it collapses to
        0 the prompt no longer teaches anything.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}")
    r = rewards.double().view(-1, group_size)
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.view(-1, group_size).bool()
    w = v.double()
    count = w.sum(-1, keepdim=True)
    mean = (r * w).sum(-1, keepdim=True) / count.clamp_min(1)
    var = ((r - mean) ** 2 * w).sum(-1, keepdim=True) / (count - 1).clamp_min(1)
    group_std = var.sqrt()
    centred = torch.where(v, r - mean, torch.zeros_like(r))
    if scale == "group":
        denom = group_std.clamp_min(min_std)
    elif scale == "batch":
        if batch_std is None:
            flat = r[v]
            batch_std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=torch.float64)
        denom = torch.as_tensor(batch_std, dtype=torch.float64).clamp_min(min_std)
    elif scale == "none":
        denom = torch.ones((), dtype=torch.float64)
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    adv = centred / denom
    return adv.view(-1).to(rewards.dtype), group_std.view(-1).to(rewards.dtype)
