"""Rollouts: G sampled completions per prompt, as token ids and the masks every later stage uses.

Layout of one row: ``[pad .. pad, prompt tokens | completion tokens, eos, pad .. pad]``: prompts are
left-padded to a common length P, completions right-padded to a common length C. The rows of one prompt are
contiguous (``group_size`` of them), so a group is ``rows[i * G:(i + 1) * G]``.

Engines (``rollout_engine``): ``hf`` (``hf.py``: one ``generate`` call for every sample) and ``vllm``
(``vllm.py``: a vLLM engine in the training process, given the policy's weights after every update). Both sample
the same distribution: the policy at ``temperature`` (optionally cut to ``top_k`` / ``top_p``), no repetition
penalty, at least one token, the model's eos set, the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

ENGINES = ("auto", "hf", "vllm")


@dataclass
class Rollout:
    input_ids: Tensor  # [N, P + C]
    attention_mask: Tensor  # [N, P + C]: 1 on real prompt and completion tokens (eos included)
    completion_mask: Tensor  # [N, P + C]: 1 on completion tokens up to and including the first eos
    truncated: Tensor  # [N] bool: no eos within max_new_tokens
    prompt_index: Tensor  # [N]: which prompt of the step each row answers
    prompt_length: int  # P
    # [N, P + C] float32: the rollout engine's own log-prob of each sampled token, at the completion positions
    # (0 elsewhere), aligned like the trainer's; None when the engine does not report them (hf)
    sampler_logprobs: Tensor | None = None

    @property
    def completion_lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, rows=slice(None), cols=slice(None)) -> "Rollout":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v[rows, cols] if v.dim() == 2 else v[rows]
            values[f.name] = v
        return Rollout(**values)

    def select(self, rows: slice) -> "Rollout":
        return self._map(rows=rows)

    def columns(self, end: int) -> "Rollout":
        """The first ``end`` columns of every row (what ``trim`` keeps)."""
        return self._map(cols=slice(0, end))


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


def assemble(prompt_ids: list[list[int]], completions: Tensor, eos: list[int], pad_id: int, group_size: int,
             sampler_logprobs: Tensor | None = None) -> Rollout:
    """The :class:`Rollout` of ``G`` completions per prompt (``completions``: ``[N, C]`` as generated, rows of a
    prompt contiguous; ``sampler_logprobs``: ``[N, C]`` of the same tokens, when the engine reports them)."""
    device = completions.device
    repeated = [p for p in prompt_ids for _ in range(group_size)]
    prompt, prompt_mask = left_pad(repeated, pad_id)
    prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
    comp_mask, truncated = completion_masks(completions, eos)
    completions = torch.where(comp_mask.bool(), completions, torch.full_like(completions, pad_id))
    zeros = torch.zeros_like(prompt_mask)
    if sampler_logprobs is not None:
        sampler_logprobs = torch.cat([zeros.float(), sampler_logprobs.float() * comp_mask], 1)
    return Rollout(
        input_ids=torch.cat([prompt, completions], 1),
        attention_mask=torch.cat([prompt_mask, comp_mask], 1),
        completion_mask=torch.cat([zeros, comp_mask], 1),
        truncated=truncated,
        prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(group_size),
        prompt_length=prompt.shape[1],
        sampler_logprobs=sampler_logprobs,
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if ids is not None else tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an eos token")
    return ids


def pad_token_id(tokenizer, eos: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def rollout(model, tokenizer, prompt_ids, **kwargs) -> Rollout:
    """One HF ``generate`` rollout (``hf.generate_rollout``): evaluation and tests sample this way."""
    from sirl.rollout.hf import generate_rollout

    return generate_rollout(model, tokenizer, prompt_ids, **kwargs)
