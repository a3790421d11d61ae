"""The KL anchor: the policy as it was before training.

With LoRA the reference costs nothing: the same model with its adapters disabled. With full fine-tuning it is
a frozen copy taken before the first update (a resumed run rebuilds it from the original weights); under
``parallel=fsdp`` that copy is sharded like the policy.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from sirl.passes import TokenScorer, as_scorer


def is_peft_model(model) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


class Reference:
    def __init__(self, policy, shard=None):
        """``shard``: how the policy's scorer is built (``sirl.sharding.shard`` under FSDP), for the frozen copy."""
        if is_peft_model(policy):
            self.frozen = None
        else:
            frozen = copy.deepcopy(policy).eval().requires_grad_(False)
            self.frozen = shard(frozen) if shard is not None else TokenScorer(frozen)

    @contextmanager
    def model(self, policy):
        """``with ref.model(policy) as m:`` gives a scorer (``sirl.passes.TokenScorer``) computing the reference
        distribution; ``policy`` is the policy's scorer (or the model itself)."""
        if self.frozen is None:
            scorer = as_scorer(policy)
            with scorer.model.disable_adapter():
                yield scorer
        else:
            yield self.frozen


@torch.no_grad()
def reference_logprobs(reference: Reference, policy, rollout, temperature: float, token_budget: int,
                       check_labels: bool = True, support: tuple[int, float] | None = None):
    from sirl.passes import token_logprobs_entropy

    with reference.model(policy) as ref_model:
        logprobs, _ = token_logprobs_entropy(ref_model, rollout, temperature, token_budget, check_labels, support)
    return logprobs
