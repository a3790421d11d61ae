"""Sample G completions per prompt with HF ``generate``; return token ids and the masks every later stage uses.

Layout of one row: ``[pad .. pad, prompt tokens | completion tokens, eos, pad .. pad]``: prompts are
left-padded to a common length P, completions right-padded to a common length C. The rows of one prompt are
contiguous (``group_size`` of them), so a group is ``rows[i * G:(i + 1) * G]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollout:
    input_ids: Tensor  # [N, P + C]
    attention_mask: Tensor  # [N, P + C]: 1 on real prompt and completion tokens (eos included)
    completion_mask: Tensor  # [N, P + C]: 1 on completion tokens up to and including the first eos
    truncated: Tensor  # [N] bool: no eos within max_new_tokens
    prompt_index: Tensor  # [N]: which prompt of the step each row answers
    prompt_length: int  # P

    @property
    def completion_lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice) -> "Rollout":
        return Rollout(
            self.input_ids[rows], self.attention_mask[rows], self.completion_mask[rows], self.truncated[rows],
            self.prompt_index[rows], self.prompt_length,
        )


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def completion_masks(completions: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """``[N, C]`` generated tokens -> (mask up to and including the first eos, truncated flag)."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an eos strictly earlier in the row
    mask = (~seen_before).long()
    truncated = ~is_eos.any(-1)
    return mask, truncated


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if ids is not None else tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an eos token")
    return ids


@torch.no_grad()
def rollout(
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    repeated = [p for p in prompt_ids for _ in range(group_size)]
    prompt, prompt_mask = left_pad(repeated, pad_id)
    prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    gen_config = GenerationConfig(
        do_sample=do_sample, max_new_tokens=max_new_tokens, min_new_tokens=1, pad_token_id=pad_id,
        eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, **sampling,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt, attention_mask=prompt_mask, generation_config=gen_config)
    finally:
        model.train(was_training)
    completions = out[:, prompt.shape[1]:]
    comp_mask, truncated = completion_masks(completions, eos)
    completions = torch.where(comp_mask.bool(), completions, torch.full_like(completions, pad_id))
    zeros = torch.zeros_like(prompt_mask)
    return Rollout(
        input_ids=torch.cat([prompt, completions], 1),
        attention_mask=torch.cat([prompt_mask, comp_mask], 1),
        completion_mask=torch.cat([zeros, comp_mask], 1),
        truncated=truncated,
        prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(group_size),
        prompt_length=prompt.shape[1],
    )
