"""The model's passes over a rollout: micro-batches, the no-grad scoring pass, the loss pass (forward + backward).

Every pass goes through ``sirl_kernels.hf.causal_lm_token_stats`` (decoder body + fused head on the
completion rows), so no ``[B, T, V]`` logits exist. Micro-batches hold at most ``micro_batch_tokens`` padded tokens;
the loss pass keeps whole groups in one micro-batch when the rewards come from its own forward (``ScoreInLoss``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sirl.loss import sirl_loss
from sirl.rollout import Rollout
from sirl_kernels import TokenStats
from sirl_kernels.hf import causal_lm_token_stats


class TokenScorer(torch.nn.Module):
    """A causal LM's per-token log-probs and entropies (``sirl_kernels.hf``) as one module, the thing every pass
    calls. Under ``parallel=fsdp`` it is the root FSDP unit (``sirl.sharding``): its forward unshards the parameters
    outside the decoder layers (embeddings, final norm, lm_head) for the fused head, and its backward
    reduce-scatters their gradients, so the fused head needs no special case under sharding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, temperature: float = 1.0,
                check_labels: bool = True, extra: tuple[str, ...] = (), support: tuple[int, float] | None = None,
                confidence_k: int = 0) -> TokenStats:
        """Log-probs, entropies and the ``extra`` statistics (``sirl_kernels.STATISTICS``, and
        ``top_k_confidence`` over the ``confidence_k`` most probable tokens), ``[B, T]`` each; with
        ``support=(top_k, top_p)`` the log-probs and entropies of the sampler's truncated distribution."""
        kernel_stats = tuple(name for name in extra if name != "top_k_confidence")
        return causal_lm_token_stats(self.model, input_ids, attention_mask, completion_mask,
                                     want=("logprobs", "entropy", *kernel_stats), temperature=temperature,
                                     check_labels=check_labels, support=support,
                                     confidence_k=confidence_k if "top_k_confidence" in extra else 0)


def logprob_support(cfg) -> tuple[int, float] | None:
    """``(top_k, top_p)`` when the trainer scores the sampler's truncated distribution (``logprob_support``)."""
    return (cfg.top_k, cfg.top_p) if cfg.logprob_support == "sampler" else None


def as_scorer(model) -> TokenScorer:
    """``model`` itself when it is a :class:`TokenScorer`, else a (plain) one around it."""
    return model if isinstance(model, TokenScorer) else TokenScorer(model)


def micro_batches(rollout: Rollout, token_budget: int, whole: int = 1) -> list[slice]:
    """Consecutive row slices with at most ``token_budget`` padded tokens each (at least ``whole`` rows, and a
    multiple of ``whole`` rows: ``whole=G`` keeps every group in one micro-batch)."""
    rows_per = max(whole, token_budget // max(1, rollout.input_ids.shape[1]) // whole * whole)
    return [slice(s, min(s + rows_per, len(rollout))) for s in range(0, len(rollout), rows_per)]


def trim(rollout: Rollout) -> Rollout:
    """Drops trailing columns no row uses (micro-batches of short completions run shorter)."""
    used = rollout.attention_mask.any(0).nonzero()
    end = int(used.max()) + 1 if used.numel() else rollout.input_ids.shape[1]
    return rollout.select(slice(None)) if end == rollout.input_ids.shape[1] else rollout.columns(end)


@torch.no_grad()
def token_logprobs_entropy(model, rollout: Rollout, temperature: float, token_budget: int, check_labels: bool = True,
                           support: tuple[int, float] | None = None) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` ``[N, T]`` float32, zero outside the completion (alignment: sirl_kernels.hf)."""
    stats = token_statistics(model, rollout, temperature, token_budget, check_labels, support=support)
    return stats["logprobs"], stats["entropy"]


@torch.no_grad()
def token_statistics(model, rollout: Rollout, temperature: float, token_budget: int, check_labels: bool = True,
                     extra: tuple[str, ...] = (), support: tuple[int, float] | None = None,
                     confidence_k: int = 0) -> dict[str, Tensor]:
    """``{"logprobs", "entropy", *extra}``: ``[N, T]`` float32 each, zero outside the completion, one no-grad pass
    over micro-batches of at most ``token_budget`` padded tokens.

    ``check_labels=False`` skips the kernels' per-call token-id check (a host sync per micro-batch on CUDA): for
    callers that validated the ids once (the trainer, once per rollout). The pass still syncs once per micro-batch
    in ``sirl_kernels.hf``, whose boolean-mask gather of the predicting rows needs their count on the host."""
    model = as_scorer(model)
    names = ("logprobs", "entropy", *extra)
    out = {name: torch.zeros(rollout.input_ids.shape, dtype=torch.float32, device=rollout.input_ids.device)
           for name in names}
    was_training = model.training
    model.eval()  # no dropout and no gradient checkpointing in a no-grad pass
    try:
        for rows in micro_batches(rollout, token_budget):
            mb = trim(rollout.select(rows))
            stats = model(mb.input_ids, mb.attention_mask, mb.completion_mask, temperature, check_labels, extra,
                          support, confidence_k)
            for name in names:
                value = getattr(stats, name)
                out[name][rows, : value.shape[1]] = value
    finally:
        model.train(was_training)
    return out


def loss_normalisers(batch: Rollout, loss_mask: Tensor, dd) -> dict:
    """Token and sequence counts over the whole batch (all ranks): what makes micro-batch losses add up."""
    counts = torch.stack([loss_mask.sum(), loss_mask.any(-1).sum()]).double()
    tokens, seqs = dd.all_sum_tensor(counts).tolist()  # one host read for both
    return dict(total_tokens=tokens, total_sequences=seqs,
                max_completion_tokens=batch.input_ids.shape[1] - batch.prompt_length)


def truncated_is_weights(trainer_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS): ``min(pi_trainer / pi_sampler, cap)`` per token, detached. The
    rollout engine samples from its own numerics (another kernel, another precision); this reweights each token's
    policy gradient to the trainer's distribution, capped so one token cannot dominate (verl, TRL)."""
    return (trainer_logprobs.detach() - sampler_logprobs).clamp(max=20.0).exp().clamp(max=cap)


def policy_gradient_pass(
    policy, batch: Rollout, old_logprobs, ref_logprobs, advantages, loss_mask, cfg, dd, autocast,
    score_in_loss=None,
) -> dict:
    """Forward + backward over micro-batches, gradients accumulated and summed across ranks. No optimizer step.

    With ``score_in_loss`` (on-policy; ``old_logprobs`` and ``advantages`` are then None), each micro-batch holds
    whole groups: its forward's own log-probs, detached, are the old ones (the ratio is exactly 1, its gradient
    the policy gradient) and its entropies give the rewards and advantages before its loss is formed. With
    ``cfg.tis_cap`` and the sampler's log-probs in the rollout, each token's policy gradient is weighted by
    :func:`truncated_is_weights`."""
    scorer = as_scorer(policy)
    norm = loss_normalisers(batch, loss_mask, dd)
    keys = ("tokens", "outside_support", "clipped_tokens", "kl_sum", "loss")
    totals = torch.zeros(len(keys), dtype=torch.float64, device=batch.input_ids.device)  # summed on the device
    whole = cfg.group_size if score_in_loss is not None else 1
    use_tis = cfg.tis_cap is not None and batch.sampler_logprobs is not None
    for rows in micro_batches(batch, cfg.micro_batch_tokens, whole):
        mb = trim(batch.select(rows))
        width = mb.input_ids.shape[1]
        extra = () if score_in_loss is None else score_in_loss.scoring.extra_statistics
        confidence_k = 0 if score_in_loss is None else score_in_loss.scoring.confidence_k
        with autocast:  # the ids were validated once after the rollout: no check per call
            out = scorer(mb.input_ids, mb.attention_mask, mb.completion_mask, cfg.temperature, False, extra,
                         logprob_support(cfg), confidence_k)
        new_logprobs = out.logprobs
        if score_in_loss is None:
            old, adv = old_logprobs[rows, :width], advantages[rows]
        else:
            old = new_logprobs.detach()
            further = {name: getattr(out, name).detach() for name in extra}
            adv = score_in_loss(rows, out.entropy.detach(), old, further)
        weights = truncated_is_weights(old, mb.sampler_logprobs, cfg.tis_cap) if use_tis else None
        loss, stats = sirl_loss(
            new_logprobs, old, None if ref_logprobs is None else ref_logprobs[rows, :width],
            adv, loss_mask[rows, :width],
            eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high, log_ratio_clamp=cfg.log_ratio_clamp,
            kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator, kl_clamp=cfg.kl_clamp,
            aggregation=cfg.loss_aggregation, is_weights=weights, **norm,
        )
        loss.backward()
        totals += torch.stack([stats[k].double() for k in keys])
    if not dd.sharded:  # FSDP reduce-scatters (sums) the gradients itself, in the backward
        dd.sum_gradients([p for p in scorer.parameters() if p.requires_grad])
    tokens, outside, clipped, kl_sum, loss = dd.all_sum_tensor(totals).tolist()  # the pass's one host read
    # tokens: those left in the loss; outside: those the trainer's support gave probability 0 (sirl_loss)
    return {"loss": loss, "clip_frac": clipped / max(tokens, 1.0), "kl": kl_sum / max(tokens, 1.0),
            "outside_support_frac": outside / max(tokens + outside, 1.0)}
