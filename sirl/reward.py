"""What a SIRL reward is: one frozen, self-validating spec, the one place its options are defined.

``sirl train`` (its config keys of the same names), ``sirl.integrations.trl.SIRLGRPOConfig`` (the same fields
prefixed ``sirl_``) and ``sirl.integrations.verl.SIRLRewardManager`` (``reward_kwargs`` of the same names) all build
a :class:`RewardSpec`, and ``sirl.scoring`` computes every reward from one. A new option is a new field here (and
one line in ``SIRLConfig`` naming it).

The rewards:

- ``neg_entropy`` (SIRL, the paper): minus the mean (or sum) over the completion tokens of the entropy of the
  policy's next-token distribution at the sampling temperature: confident answers score higher;
- ``entropy``: its negation (the paper's "reversed reward" ablation: uncertain answers score higher);
- ``self_certainty`` (Intuitor, arXiv 2505.19590): plus the mean (or sum) over the completion tokens of
  ``KL(U || p)``, the policy's next-token distribution's divergence from uniform: also "confident answers score
  higher", measured by the distance from uniform rather than the entropy (less dominated by the tail of the
  vocabulary);
- ``random``: a uniform number in [0, 1) per response, from a counter-based hash of the run's seed, the step and
  the response's row (the paper's "random reward" ablation: the same GRPO update driven by noise advantages);
  reproducible, independent of the response, and the same whichever micro-batch scores it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from sirl.knobs import ConfigError, check_dataclass, copy_knob, knob

REWARDS = ("neg_entropy", "entropy", "self_certainty", "random")
ABLATIONS = ("entropy", "random")  # rewards that exist to be compared with SIRL, not to train with


@dataclass(frozen=True)
class RewardSpec:
    reward: str = knob("neg_entropy", "neg_entropy = minus the completion's entropy (SIRL); self_certainty = its "
                       "KL from uniform (Intuitor); entropy (reversed) and random are the paper's ablations",
                       choices=REWARDS)
    reward_aggregation: str = knob("mean", "minus the mean (paper) or the sum of the completion tokens' entropy",
                                   choices=("mean", "sum"))
    reward_last_k: int | None = knob(None, "only the last k completion tokens count toward the reward", ge=1)
    truncation: str = knob("keep", "completions cut at max_new_tokens: keep, mask (no loss) or penalize",
                           choices=("keep", "mask", "penalize"))
    truncation_penalty: float = knob(-10.0, "the fixed reward of a truncated completion under truncation=penalize")

    def __post_init__(self):
        for name, value in check_dataclass(self).items():  # converts text ("1e-3", "null") and checks ranges
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, options: dict, prefix: str = "") -> "RewardSpec":
        """From ``{prefix + field: value}`` (a config, TRL's ``sirl_*`` arguments, verl's reward kwargs); other keys
        are ignored, a missing one takes its default. Errors name the option as the caller spells it."""
        values = {f.name: options[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in options}
        try:
            return cls(**values)
        except ConfigError as exc:
            if not prefix:
                raise
            names = "|".join(FIELDS)
            raise ConfigError(re.sub(rf"(?<![\w.])({names})=", rf"{prefix}\1=", str(exc))) from None

    @classmethod
    def of(cls, config) -> "RewardSpec":
        """From an object with the fields as attributes (``SIRLConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @staticmethod
    def knob(name: str):
        """A field with this option's default, doc and range, for a dataclass that exposes it (``SIRLConfig``)."""
        return copy_knob(FIELDS[name])

    @property
    def statistic(self) -> str:
        """The per-token statistic the reward reads (``sirl_kernels.STATISTICS``)."""
        return "self_certainty" if self.reward == "self_certainty" else "entropy"

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


FIELDS = {f.name: f for f in dataclasses.fields(RewardSpec)}
