"""The scoring stage: per-token entropies -> rewards -> group advantages, from one :class:`RewardSpec`.

The one owner of this computation: ``sirl train``'s loop (a no-grad scoring pass, or the training forward itself
on-policy: ``ScoreInLoss``), ``sirl.integrations.trl`` and ``sirl.integrations.verl`` all call
:func:`sirl_rewards` with a spec, and the loop forms advantages with :class:`Scoring`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sirl.advantage import group_advantages
from sirl.reward import RewardSpec


def reward_mask(completion_mask: Tensor, last_k: int | None = None) -> Tensor:
    """The tokens whose entropy counts: all completion tokens, or only each row's last ``last_k`` of them."""
    mask = completion_mask.bool()
    if last_k is None:
        return mask
    from_end = mask.long().flip(-1).cumsum(-1).flip(-1)  # 1 on the last completion token, 2 before it, ...
    return mask & (from_end <= last_k)


def valid_rows(truncated: Tensor, truncation: str = "keep") -> Tensor:
    """``[N]`` bool: the sequences that take part in the loss and in their group's statistics (all of them, but
    the truncated ones under ``truncation="mask"``); known before any reward is."""
    if truncation not in ("keep", "mask", "penalize"):
        raise ValueError(f"truncation must be 'keep', 'mask' or 'penalize', got {truncation!r}")
    return ~truncated.bool() if truncation == "mask" else torch.ones_like(truncated, dtype=torch.bool)


def uniform_from_keys(keys: list[tuple]) -> Tensor:
    """A number in [0, 1) for each key (a tuple of ints): the top 53 bits of its sha256, so the same key gives the
    same number on every machine, in any batch, after any resume."""
    values = [int.from_bytes(hashlib.sha256(repr(tuple(k)).encode()).digest()[:8], "little") >> 11 for k in keys]
    return torch.tensor(values, dtype=torch.float64) / 2.0**53


def sirl_rewards(entropy: Tensor, completion_mask: Tensor, truncated: Tensor, spec: RewardSpec = RewardSpec(),
                 keys: list[tuple] | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence reward and which sequences take part in the loss.

    Args:
        entropy: ``[N, T]`` the per-token statistic ``spec.statistic`` names (that of the distribution which
            produced token t): the entropy, or the self-certainty for ``reward=self_certainty``.
        completion_mask: ``[N, T]``, 1 on the completion tokens.
        truncated: ``[N]`` bool, completions that hit the length limit: kept as they are, excluded from the loss
            and from their group's statistics, or given ``truncation_penalty`` (``spec.truncation``).
        keys: one tuple of ints per row naming it uniquely in the run (e.g. seed, step, row): only the ``random``
            reward reads them.

    Returns:
        ``(rewards [N] float32, valid [N] bool)``.
    """
    mask = reward_mask(completion_mask, spec.reward_last_k).to(entropy.dtype)
    total = (entropy * mask).sum(-1)
    mean_or_sum = total / mask.sum(-1).clamp_min(1.0) if spec.reward_aggregation == "mean" else total
    if spec.reward == "neg_entropy":
        rewards = -mean_or_sum
    elif spec.reward in ("entropy", "self_certainty"):
        rewards = mean_or_sum
    else:  # random
        if keys is None or len(keys) != entropy.shape[0]:
            raise ValueError("reward=random needs one key per row (the caller's seed, step and row)")
        rewards = uniform_from_keys(keys).to(device=entropy.device, dtype=entropy.dtype)
    valid = valid_rows(truncated, spec.truncation)
    if spec.truncation == "penalize":
        rewards = torch.where(truncated, torch.full_like(rewards, spec.truncation_penalty), rewards)
    return rewards.float(), valid


@dataclass
class Scores:
    """A rollout's rewards and advantages, and the per-token entropies they are made of."""

    entropy: Tensor  # [N, T] entropy of the distribution that produced each completion token
    logprobs: Tensor | None  # [N, T] the trainer's log-prob of each sampled token (for the sampler mismatch)
    rewards: Tensor  # [N] the reward
    advantages: Tensor  # [N]
    group_std: Tensor  # [N / G]
    extra: dict = field(default_factory=dict)  # [N, T] further statistics of the pass (Scoring.extra_statistics)


@dataclass(frozen=True)
class Scoring:
    """Entropies of a rollout -> rewards (the spec) -> group advantages (GRPO's z-score, or its variants)."""

    spec: RewardSpec
    group_size: int
    advantage_scale: str = "group"
    advantage_min_std: float = 1e-4
    confidence_k: int = 0  # > 0: DeepConf's top-k token confidence as a metric (config confidence_top_k)

    @classmethod
    def of(cls, cfg) -> "Scoring":
        return cls(RewardSpec.of(cfg), cfg.group_size, cfg.advantage_scale, cfg.advantage_min_std,
                   cfg.confidence_top_k)

    @property
    def extra_statistics(self) -> tuple[str, ...]:
        """What a scoring pass computes besides log-probs and entropies: the reward's statistic, varentropy (a
        metric: a confidence signal and an entropy-collapse diagnostic) and, when ``confidence_k``, the top-k
        confidence (a metric)."""
        metrics = ("varentropy",) + (("top_k_confidence",) if self.confidence_k else ())
        return tuple(dict.fromkeys(s for s in (self.spec.statistic, *metrics) if s != "entropy"))

    def __call__(self, batch, entropy: Tensor, logprobs: Tensor | None = None, keys: list[tuple] | None = None,
                 dd=None, extra: dict | None = None) -> Scores:
        """Scores of the rows of ``batch`` (whole groups). A batch-wide std spans every rank of ``dd``. ``extra``:
        the further ``[N, T]`` statistics of the pass (``extra_statistics``); the reward reads its statistic."""
        extra = extra or {}
        values = entropy if self.spec.statistic == "entropy" else extra[self.spec.statistic]
        rewards, valid = sirl_rewards(values, batch.completion_mask, batch.truncated, self.spec, keys)
        batch_std = None
        if self.advantage_scale == "batch":
            all_rewards = rewards if dd is None else dd.all_cat(rewards)
            all_valid = valid if dd is None else dd.all_cat(valid)
            batch_std = all_rewards[all_valid].std()
        advantages, group_std = group_advantages(rewards, self.group_size, scale=self.advantage_scale,
                                                 min_std=self.advantage_min_std, valid=valid, batch_std=batch_std)
        return Scores(entropy, logprobs, rewards, advantages, group_std, extra)


class ScoreInLoss:
    """On-policy scoring from the training forward: called once per micro-batch (whole groups) with its rows and
    their entropies, returns their advantages and fills ``scores`` for the whole rollout."""

    def __init__(self, scoring: Scoring, batch, keys: list[tuple] | None = None):
        self.scoring, self.batch, self.keys = scoring, batch, keys
        n, g = len(batch), scoring.group_size
        zeros = torch.zeros(n, device=batch.input_ids.device)
        tokens = torch.zeros(batch.input_ids.shape, device=zeros.device)
        self.scores = Scores(tokens, tokens.clone(), zeros.clone(), zeros.clone(), torch.zeros(n // g, device=zeros.device),
                             {name: tokens.clone() for name in scoring.extra_statistics})

    def __call__(self, rows: slice, entropy: Tensor, logprobs: Tensor, extra: dict | None = None) -> Tensor:
        """The advantages of ``rows`` from the training forward's (detached) entropies, log-probs and further
        statistics."""
        s, g = self.scores, self.scoring.group_size
        s.entropy[rows, : entropy.shape[1]] = entropy.float()
        s.logprobs[rows, : logprobs.shape[1]] = logprobs.float()
        for name, values in (extra or {}).items():
            s.extra[name][rows, : values.shape[1]] = values.float()
        keys = None if self.keys is None else self.keys[rows]
        part = self.scoring(self.batch.select(rows), s.entropy[rows], keys=keys,  # per group: no other rank needed
                            extra={name: t[rows] for name, t in s.extra.items()})
        s.rewards[rows], s.advantages[rows] = part.rewards, part.advantages.float()
        s.group_std[rows.start // g: rows.stop // g] = part.group_std
        return s.advantages[rows]
