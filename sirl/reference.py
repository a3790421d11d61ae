"""The KL anchor: the policy as it was before training.

With LoRA the reference costs nothing: the same model with its adapters disabled. With full fine-tuning it is
a frozen copy taken before the first update (a resumed run rebuilds it from the original weights).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch


def is_peft_model(model) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


class Reference:
    def __init__(self, policy):
        if is_peft_model(policy):
            self.frozen = None
        else:
            self.frozen = copy.deepcopy(policy).eval().requires_grad_(False)

    @contextmanager
    def model(self, policy):
        """``with ref.model(policy) as m:`` gives a module computing the reference distribution."""
        if self.frozen is None:
            with policy.disable_adapter():
                yield policy
        else:
            with nullcontext():
                yield self.frozen


@torch.no_grad()
def reference_logprobs(reference: Reference, policy, rollout, temperature: float, token_budget: int,
                       check_labels: bool = True):
    from sirl.passes import token_logprobs_entropy

    with reference.model(policy) as ref_model:
        logprobs, _ = token_logprobs_entropy(ref_model, rollout, temperature, token_budget, check_labels)
    return logprobs
