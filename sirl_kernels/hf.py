"""Hugging Face causal LMs -> per-token log-probs and entropies, without ever building ``[B, T, V]`` logits.

The decoder body runs to its final hidden states; only the rows that predict completion tokens are gathered,
and the fused ``linear_token_logprobs_entropy`` op applies the output embedding to them chunk by chunk.

Alignment (the one thing to get right): for a sequence ``x_0 .. x_{T-1}`` the value at position ``t`` is about
token ``x_t``, predicted from the hidden state at position ``t - 1``::

    logprobs[b, t] = log p(x_t | x_<t)          (at the given temperature)
    entropy[b, t]  = H(p(. | x_<t))             (the distribution that produced x_t)

Position 0 has no prediction and is always 0, as is every position where ``completion_mask`` is 0. This is
the usual HF shift (``logits[:, :-1]`` against ``labels[:, 1:]``) written back at the label's position, so the
masks of a rollout (1 on completion tokens) can be used unchanged.

Typical use in a custom trainer (the SIRL reward in three lines)::

    from sirl_kernels.hf import sirl_reward
    with torch.no_grad():
        rewards = sirl_reward(model, input_ids, attention_mask, completion_mask)   # [B], higher = more confident
"""

from __future__ import annotations

import torch
from torch import Tensor

from sirl_kernels.api import linear_token_logprobs_entropy


def _unwrap(model):
    """PEFT wrappers -> the underlying transformers model, with the LoRA layers still injected and active."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    # torch.compile / DDP wrappers keep the real module here.
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _logit_temperature(config, temperature: float) -> float:
    """Folds the model's own logit scaling into the temperature (logits are linear in it), or refuses."""
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"final_logit_softcapping={softcap} (e.g. Gemma 2) applies tanh to the logits, which the fused "
            "linear op does not implement; compute logits yourself and use sirl_kernels.token_logprobs_entropy"
        )
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if scale is not None:
        temperature = temperature / float(scale)
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if divisor is not None:
        temperature = temperature * float(divisor)
    return temperature


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, T, D]`` output of the decoder body (final norm included), with positions counted from the first
    real token so that left-padded prompts see the same positions as in ``generate``."""
    base = _unwrap(model)
    decoder = base.get_decoder()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        return_dict=True,
    )
    return out.last_hidden_state


def causal_lm_token_logprobs_entropy(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of the next token and entropy of the distribution that produced it.

    Args:
        model: a transformers ``*ForCausalLM`` (optionally PEFT-wrapped; the active adapters are used).
        input_ids, attention_mask: ``[B, T]``.
        completion_mask: ``[B, T]``, 1 on the tokens to score (e.g. the completion). Position 0 is ignored.
        temperature: the logits are divided by it (on top of the model's own ``logit_scale``).

    Returns:
        ``(logprobs, entropy)``, float32 ``[B, T]``; see the module docstring for the alignment. Differentiable
        with respect to the model's parameters when grad is enabled.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, attention_mask and completion_mask must all be [B, T]; got {tuple(input_ids.shape)}, "
            f"{tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}"
        )
    base = _unwrap(model)
    temperature = _logit_temperature(base.config, float(temperature))
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding (is it a *ForCausalLM?)")
    if hasattr(head, "base_layer") or not isinstance(getattr(head, "weight", None), Tensor):
        raise NotImplementedError(
            "the output embedding is wrapped (e.g. LoRA on lm_head); the fused op needs a plain weight matrix"
        )

    hidden = final_hidden_states(model, input_ids, attention_mask)
    # Row t-1 predicts token t: gather only the rows whose next token is scored.
    predict = completion_mask[:, 1:].bool()
    rows = hidden[:, :-1][predict]
    labels = input_ids[:, 1:][predict]
    weight, bias = head.weight, getattr(head, "bias", None)
    if rows.dtype != weight.dtype:  # autocast can leave the body in bf16 while the head stays fp32
        rows = rows.to(weight.dtype)
    lp_rows, ent_rows = linear_token_logprobs_entropy(
        rows, weight, labels, bias=bias, temperature=temperature, backend=backend
    )

    logprobs = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    # Out-of-place scatter keeps the graph: gradients flow back into lp_rows / ent_rows.
    full = predict.new_zeros(input_ids.shape)
    full[:, 1:] = predict
    logprobs = logprobs.masked_scatter(full, lp_rows)
    entropy = entropy.masked_scatter(full, ent_rows)
    return logprobs, entropy


def sirl_reward(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """The SIRL reward: minus the mean per-token entropy over each sequence's completion tokens, ``[B]`` float32.

    The entropy counted for token ``t`` is that of the distribution that produced it. Sequences with no scored
    token get 0. Call under ``torch.no_grad()`` (the reward is a constant for the policy gradient).
    """
    _, entropy = causal_lm_token_logprobs_entropy(
        model, input_ids, attention_mask, completion_mask, temperature=temperature
    )
    mask = completion_mask.clone()
    mask[:, 0] = 0
    mask = mask.to(entropy.dtype)
    return -(entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
