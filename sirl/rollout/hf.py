"""The ``hf`` rollout engine: one ``transformers`` ``generate`` call for all G x P samples of a step.

It samples from the policy module itself, so it needs no weight sync and reports no log-probs of its own (the
trainer's are those of the same module: there is no sampler-vs-trainer mismatch to measure).
"""

from __future__ import annotations

import torch

from sirl.rollout import Rollout, assemble, eos_token_ids, left_pad, pad_token_id


@torch.no_grad()
def generate_rollout(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
) -> Rollout:
    """G samples per prompt. A fresh GenerationConfig keeps the model's own defaults (top_k = 50, repetition
    penalties, ...) out: the policy gradient assumes samples come from the policy at ``temperature``.
    ``do_sample=False`` decodes greedily instead (evaluation; temperature, top_p and top_k are then unused)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos)
    prompt, prompt_mask = left_pad([p for p in prompt_ids for _ in range(group_size)], pad_id)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    gen_config = GenerationConfig(
        do_sample=do_sample, max_new_tokens=max_new_tokens, min_new_tokens=1, pad_token_id=pad_id,
        eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, **sampling,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt.to(device), attention_mask=prompt_mask.to(device),
                             generation_config=gen_config)
    finally:
        model.train(was_training)
    return assemble(prompt_ids, out[:, prompt.shape[1]:], eos, pad_id, group_size)


class HFEngine:
    """``rollout_engine=hf``: samples with the policy's own ``generate``."""

    name = "hf"

    def __init__(self, policy, tokenizer, cfg):
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg

    def generate(self, prompt_ids: list[list[int]], seed: int | None = None) -> Rollout:
        cfg = self.cfg
        return generate_rollout(self.policy, self.tokenizer, prompt_ids, group_size=cfg.group_size,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k)

    def sync_weights(self) -> None:
        """Nothing to do: ``generate`` runs the policy module itself."""

    def before_update(self) -> None:
        pass
