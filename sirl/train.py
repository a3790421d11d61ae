"""The SIRL loop. One step, top to bottom:

    prompts -> rollout (G samples each) -> score (entropy -> reward = -mean entropy -> group z-score advantage)
            -> reference log-probs -> loss (clipped surrogate + beta KL, micro-batched) -> optimizer step
            -> evaluation (every eval_every steps) -> metrics line, checkpoint

On-policy (one update per rollout, the default) the score comes from the loss pass itself: each micro-batch holds
whole groups, its forward's entropies give the rewards and advantages before its loss is formed, and its detached
log-probs are the sampler's, so no separate no-grad scoring pass runs (``reward_pass``; TRL's SIRLGRPOTrainer does
the same). Off-policy (``updates_per_batch > 1``), with a batch-wide advantage std, or with dropout active in the
model (the loss pass runs in train mode), a no-grad pass scores first.

Data parallel (``torchrun``): every rank builds the same prompt stream and takes a contiguous slice of each
step's prompts, so groups never span ranks. Gradients are summed across ranks by hand after the backward passes:
the loss goes through ``sirl_kernels.hf`` (decoder body + fused head), not through ``module.forward``, which is
what ``DistributedDataParallel``'s reducer hooks onto; the loss is already normalised by the global token count,
so a plain all-reduce sum gives exactly the single-process gradient (tested).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sirl.advantage import group_advantages
from sirl.checkpoint import (
    choose_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    recover_dir,
    save_best,
    save_checkpoint,
    save_model,
    saved_config,
)
from sirl.config import ConfigError, SIRLConfig, check_resume_changes, reward_in_loss, save_config
from sirl.data import PromptStream, encode_prompt, load_prompts
from sirl.dist import Dist, init_distributed, pick_device
from sirl.eval.report import distinct_n
from sirl.eval.suite import EvalSuite, check_keep_best, evaluate, load_llm_judge, load_suite, load_suite_code
from sirl.loss import sirl_loss
from sirl.metrics import (
    Logger,
    StageTimer,
    check_logs,
    log_config_changes,
    peak_memory_mb,
    stage_split,
    timing_metrics,
)
from sirl.models import active_dropout
from sirl.reference import Reference, reference_logprobs
from sirl.rollout import Rollout, rollout
from sirl.score import micro_batches, sirl_rewards, token_logprobs_entropy, trim, valid_rows
from sirl.selection import BestTracker
from sirl_kernels import validate_labels
from sirl_kernels.hf import causal_lm_token_logprobs_entropy, output_head, unwrap_model

# ---------------------------------------------------------------------------------------------------------------
# the stages of one step (each a small function of tensors; tested alone in tests/sirl)


def lr_lambda(cfg: SIRLConfig):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def apply_optimizer_settings(optimizer, scheduler, cfg: SIRLConfig) -> None:
    """Makes a restored optimizer and schedule follow ``cfg`` (a resume may change lr, betas, weight decay,
    warm-up or schedule under --allow-config-change; with the saved settings this changes nothing)."""
    scheduler.lr_lambdas = [lr_lambda(cfg)] * len(optimizer.param_groups)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * fn(scheduler.last_epoch), weight_decay=cfg.weight_decay,
                     betas=(cfg.adam_beta1, cfg.adam_beta2))


def loss_normalisers(batch: Rollout, loss_mask: torch.Tensor, dd: Dist) -> dict:
    """Token and sequence counts over the whole batch (all ranks): what makes micro-batch losses add up."""
    counts = torch.stack([loss_mask.sum(), loss_mask.any(-1).sum()]).double()
    tokens, seqs = dd.all_sum_tensor(counts).tolist()  # one host read for both
    return dict(total_tokens=tokens, total_sequences=seqs,
                max_completion_tokens=batch.input_ids.shape[1] - batch.prompt_length)


@dataclass
class Scores:
    """A rollout's rewards and advantages, and the per-token entropies they are made of."""

    entropy: torch.Tensor  # [N, T] entropy of the distribution that produced each completion token
    rewards: torch.Tensor  # [N] the SIRL reward
    advantages: torch.Tensor  # [N]
    group_std: torch.Tensor  # [N / G]


def score(batch: Rollout, entropy: torch.Tensor, cfg: SIRLConfig, dd: Dist) -> Scores:
    """Entropies -> SIRL rewards (minus the mean entropy) -> group advantages (a batch std spans all ranks)."""
    rewards, valid = sirl_rewards(
        entropy, batch.completion_mask, batch.truncated, aggregation=cfg.reward_aggregation,
        last_k=cfg.reward_last_k, truncation=cfg.truncation, truncation_penalty=cfg.truncation_penalty,
    )
    batch_std = None
    if cfg.advantage_scale == "batch":
        all_rewards, all_valid = dd.all_cat(rewards), dd.all_cat(valid)
        batch_std = all_rewards[all_valid].std()
    advantages, group_std = group_advantages(rewards, cfg.group_size, scale=cfg.advantage_scale,
                                             min_std=cfg.advantage_min_std, valid=valid, batch_std=batch_std)
    return Scores(entropy, rewards, advantages, group_std)


class ScoreInLoss:
    """On-policy scoring from the training forward: called once per micro-batch (whole groups) with its rows and
    their entropies, returns their advantages and fills ``scores`` for the whole rollout."""

    def __init__(self, batch: Rollout, cfg: SIRLConfig):
        self.batch, self.cfg = batch, cfg
        n, g = len(batch), cfg.group_size
        zeros = torch.zeros(n, device=batch.input_ids.device)
        self.scores = Scores(torch.zeros(batch.input_ids.shape, device=zeros.device), zeros.clone(), zeros.clone(),
                             torch.zeros(n // g, device=zeros.device))

    def __call__(self, rows: slice, entropy: torch.Tensor) -> torch.Tensor:
        s, g = self.scores, self.cfg.group_size
        s.entropy[rows, : entropy.shape[1]] = entropy.float()
        part = score(self.batch.select(rows), s.entropy[rows], self.cfg, Dist())  # per-group: no other rank needed
        s.rewards[rows], s.advantages[rows] = part.rewards, part.advantages.float()
        s.group_std[rows.start // g: rows.stop // g] = part.group_std
        return s.advantages[rows]


def policy_gradient_pass(
    policy, batch: Rollout, old_logprobs, ref_logprobs, advantages, loss_mask, cfg: SIRLConfig, dd: Dist,
    autocast, score_in_loss: ScoreInLoss | None = None,
) -> dict:
    """Forward + backward over micro-batches, gradients accumulated and summed across ranks. No optimizer step.

    With ``score_in_loss`` (on-policy; ``old_logprobs`` and ``advantages`` are then None), each micro-batch holds
    whole groups: its forward's own log-probs, detached, are the sampler's (the ratio is exactly 1, its gradient
    the policy gradient) and its entropies give the rewards and advantages before its loss is formed."""
    norm = loss_normalisers(batch, loss_mask, dd)
    keys = ("tokens", "clipped_tokens", "kl_sum", "loss")
    totals = torch.zeros(len(keys), dtype=torch.float64, device=batch.input_ids.device)  # summed on the device
    whole = cfg.group_size if score_in_loss is not None else 1
    for rows in micro_batches(batch, cfg.micro_batch_tokens, whole):
        mb = trim(batch.select(rows))
        width = mb.input_ids.shape[1]
        with autocast:
            new_logprobs, entropy = causal_lm_token_logprobs_entropy(
                policy, mb.input_ids, mb.attention_mask, mb.completion_mask, temperature=cfg.temperature,
                check_labels=False,  # the ids were validated once after the rollout
            )
        if score_in_loss is None:
            old, adv = old_logprobs[rows, :width], advantages[rows]
        else:
            old, adv = new_logprobs.detach(), score_in_loss(rows, entropy.detach())
        loss, stats = sirl_loss(
            new_logprobs, old, None if ref_logprobs is None else ref_logprobs[rows, :width],
            adv, loss_mask[rows, :width],
            eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high, log_ratio_clamp=cfg.log_ratio_clamp,
            kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator, kl_clamp=cfg.kl_clamp,
            aggregation=cfg.loss_aggregation, **norm,
        )
        loss.backward()
        totals += torch.stack([stats[k].double() for k in keys])
    dd.sum_gradients([p for p in policy.parameters() if p.requires_grad])
    tokens, clipped, kl_sum, loss = dd.all_sum_tensor(totals).tolist()  # the pass's one host read of its stats
    return {"loss": loss, "clip_frac": clipped / max(tokens, 1.0), "kl": kl_sum / max(tokens, 1.0)}


# ---------------------------------------------------------------------------------------------------------------
# the loop


def build(cfg: SIRLConfig, dd: Dist, prompts: list):
    """Model (+ LoRA), tokenizer, reference, optimizer, schedule and prompt stream, all seeded."""
    from sirl.models import add_lora, load_model_and_tokenizer

    device = pick_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=device, dtype=cfg.dtype, seed=cfg.seed)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        for adapter in model.peft_config.values():  # adapter_config.json names the model as the user gave it,
            adapter.base_model_name_or_path = cfg.model  # not the path it was loaded from (e.g. inside the venv)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            model.enable_input_require_grads()
    if cfg.compile:
        unwrap_model(model).get_decoder().compile()
    reference = Reference(model) if cfg.kl_beta != 0.0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    stream = PromptStream(prompts, cfg.seed, cfg.shuffle)
    return model, tokenizer, reference, optimizer, scheduler, stream, device


def reward_from_loss_pass(cfg: SIRLConfig, policy, dd: Dist) -> bool:
    """Whether the rewards come from the training forward. The config allows it (``reward_in_loss``) only
    on-policy; the built model must also have no active dropout: the loss pass runs in train mode, so dropout would
    noise the rewards that the separate (eval-mode) scoring pass gives. Under ``auto`` that falls back to the
    separate pass; an explicit ``reward_pass=loss`` is refused."""
    if not reward_in_loss(cfg):
        return False
    dropout = active_dropout(policy)
    if dropout is None:
        return True
    if cfg.reward_pass == "loss":
        raise ConfigError(f"reward_pass=loss: not with {dropout} (the training forward is not the sampling "
                          "policy); use reward_pass=separate or auto")
    if dd.main:
        print(f"reward_pass=auto: the rewards come from a separate no-grad pass ({dropout} is active in the "
              "training forward)", flush=True)
    return False


def evaluation(step: int, policy, tokenizer, suite: EvalSuite, output_dir: Path, timer: StageTimer, dd: Dist,
               selection: BestTracker, bar=None) -> dict:
    """The evaluation at ``step``: rank 0 evaluates (the others wait) and saves the model when it is the best so
    far; returns the ``eval/*`` metrics (empty on other ranks). The caller shares the early-stop decision."""
    if bar is not None:
        bar.set_description(f"sirl (evaluating step {step})")
    metrics = {}
    with timer("eval"):
        if dd.main:
            metrics = evaluate(policy, tokenizer, suite, step=step, output_dir=output_dir)
        dd.barrier()
    if bar is not None:
        bar.set_description("sirl")
    if dd.main and selection.update(step, metrics):
        save_best(output_dir, policy, tokenizer, selection)
    return metrics


def step_metrics(step: int, batch: Rollout, scores: Scores, completions: list[list[int]], stats: dict, *,
                 grad_norm: float, lr: float, step_time: float, dd: Dist) -> dict:
    """One step's training metrics over all ranks (rollout statistics gathered, token counts summed), in the order
    of metrics.jsonl; the caller adds memory, data position, stage timings and the evaluation."""
    mask = batch.completion_mask.bool()
    seq_entropy = (scores.entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    all_rewards, all_entropy = dd.all_cat(scores.rewards), dd.all_cat(seq_entropy)
    all_len = dd.all_cat(batch.completion_lengths.float())
    all_trunc = dd.all_cat(batch.truncated.float())
    all_gstd = dd.all_cat(scores.group_std)
    distinct2 = dd.all_sum([distinct_n(completions, 2)])[0] / dd.world
    tokens, generated = dd.all_sum([float(batch.attention_mask.sum()), float(mask.sum())])
    return {
        "step": step,
        "reward_mean": all_rewards.mean().item(),
        "reward_std": all_rewards.std().item(),
        "reward_group_std": all_gstd.mean().item(),
        "entropy_mean": all_entropy.mean().item(),
        "entropy_p10": torch.quantile(all_entropy, 0.1).item(),
        "entropy_p90": torch.quantile(all_entropy, 0.9).item(),
        "kl": stats["kl"],
        "loss": stats["loss"],
        "clip_frac": stats["clip_frac"],
        "grad_norm": grad_norm,
        "lr": lr,
        "response_len_mean": all_len.mean().item(),
        "truncated_frac": all_trunc.mean().item(),
        "distinct_2": distinct2,
        "repetition": 1.0 - distinct2,
        "tokens_per_s": tokens / step_time,
        "step_time_s": step_time,  # rollout to optimizer step; the evaluation is time/eval_s
        "tokens": tokens,  # prompt + completion tokens of the step's rollout, all ranks
        "generated_tokens": generated,  # completion tokens, all ranks
    }


def train(cfg: SIRLConfig, resume: bool = False, allow_config_change: bool = False, overwrite: bool = False,
          on_build=None) -> list[dict]:
    """Runs ``cfg.steps`` steps (continuing from the newest intact checkpoint when ``resume``); returns the metric
    rows. ``on_build(policy, tokenizer, reference, optimizer)``, when given, sees what was built (benchmarks).

    Everything that can be checked without a model is checked first, in this order: the config; on ``resume``,
    the checkpoint (the newest one whose manifest and ``state.json`` hold), the differences from its saved config
    (only ``MAY_CHANGE_ON_RESUME`` keys may differ unless ``allow_config_change``; then every change is logged and
    applied, the optimizer's lr included) and the run's logs; the training prompts; the evaluation sets (and that
    ``keep_best`` names a metric they give); the output directory (a fresh run refuses another run's files unless
    ``overwrite``, which moves them aside; it must be writable). Code named by ``py:`` references is imported
    last, once all of that passed."""
    cfg.validate()
    dd = init_distributed(pick_device(cfg.device))
    if cfg.prompts_per_step % dd.world:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step}: must be divisible by the {dd.world} ranks")
    output_dir = Path(cfg.output_dir)
    checkpoint, state, changes = None, None, {}
    if resume:
        checkpoint, state = choose_checkpoint(output_dir, cfg, dd.world)
        changes = check_resume_changes(saved_config(checkpoint), cfg, allow_config_change)
        check_logs(output_dir)
    prompts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.dataset_split)
    suite = load_suite(cfg)
    check_keep_best(cfg, suite)  # against the suite's attack names as resolved (e.g. columns -> column:NAME)
    prepare_output_dir(output_dir, resume=resume, overwrite=overwrite)  # the first write, once all that passed
    load_suite_code(suite, cfg)  # imports py: references: only now that everything else has passed
    # Same seed everywhere for the model and data order; per-rank offset only for sampling (set below).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    policy, tokenizer, reference, optimizer, scheduler, stream, device = build(cfg, dd, prompts)
    if on_build is not None:
        on_build(policy, tokenizer, reference, optimizer)
    in_loss = reward_from_loss_pass(cfg, policy, dd)  # the reward from the training forward: no separate pass
    torch.manual_seed(cfg.seed + 1000 * dd.rank)
    if suite is not None and dd.main:  # only rank 0 evaluates
        load_llm_judge(suite, device, cfg.dtype)
    selection = BestTracker(cfg.keep_best, cfg.keep_best_mode, cfg.early_stop_patience)

    start = 0
    if resume:
        load_checkpoint(checkpoint, policy, optimizer, scheduler, stream, dd)
        start = state["step"]
        selection.load_state_dict(state.get("selection"))
        apply_optimizer_settings(optimizer, scheduler, cfg)
        if dd.main:
            log_config_changes(output_dir, start, changes)
            restore_best(output_dir, policy, tokenizer, selection, start)
    if dd.main:
        save_config(cfg, output_dir / "config.json")  # only now: the settings this run goes on with
    logger = Logger(output_dir, cfg.tensorboard, dd.main, start)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if cfg.bf16 and device.type == "cuda" else nullcontext())
    per_rank = cfg.prompts_per_step // dd.world
    vocab_size = output_head(unwrap_model(policy))[0].shape[0]  # rows of lm_head: the valid token ids
    encoded = {}  # prompt index -> token ids (the chat template is applied once per prompt)

    bar = None
    if cfg.progress and dd.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="sirl", dynamic_ncols=True)

    rows = []
    if selection.should_stop:
        print(f"this run stopped early at step {start} ({selection.describe()}); raise early_stop_patience "
              "to continue it")
    elif suite is not None and start == 0:
        timer = StageTimer(device)
        row = {"step": 0, **evaluation(0, policy, tokenizer, suite, output_dir, timer, dd, selection, bar)}
        row.update(timing_metrics(timer.seconds, {}))
        rows.append(row)
        logger.metrics(row)

    stopped = dd.rank0_flag(selection.should_stop)
    for step in range(start + 1, cfg.steps + 1):
        if stopped:
            break
        timer = StageTimer(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # 1. prompts: every rank draws the same step, keeps its own whole groups
        indices = stream.next_indices(cfg.prompts_per_step)[dd.rank * per_rank:(dd.rank + 1) * per_rank]
        for i in indices:
            if i not in encoded:
                encoded[i] = encode_prompt(tokenizer, stream.prompts[i], cfg.system_prompt, cfg.max_prompt_tokens)

        with autocast:
            # 2. rollout: G samples per prompt from the current policy
            with timer("rollout"):
                batch = rollout(policy, tokenizer, [encoded[i] for i in indices], group_size=cfg.group_size,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k)
                # One token-id check per rollout (one host sync) instead of one per kernel call: every pass below
                # runs the kernels with check_labels=False, and the kernel calls don't sync. (Each forward still
                # does: trim() reads the used width, and the HF helper's boolean-mask gather of the rows that
                # predict completion tokens needs their count.)
                validate_labels(batch.input_ids, vocab_size)
            # 3. score: the entropies the reward is made of, the rewards, the group advantages. On-policy they come
            #    from the training forward in step 5 (no extra pass); otherwise from one no-grad forward here,
            #    whose log-probs are also the sampler's for the ratio.
            scores = old_logprobs = None
            if not in_loss:
                with timer("score"):
                    old_logprobs, entropy = token_logprobs_entropy(policy, batch, cfg.temperature,
                                                                   cfg.micro_batch_tokens, check_labels=False)
                    scores = score(batch, entropy, cfg, dd)
            # 4. reference: log-probs of the KL anchor (the adapters disabled, or the frozen copy)
            with timer("reference"):
                ref_logprobs = (reference_logprobs(reference, policy, batch, cfg.temperature,
                                                   cfg.micro_batch_tokens, check_labels=False)
                                if reference is not None else None)

        with timer("update"):
            # 5. loss and update (mu passes over the same rollout; old log-probs stay those of the sampler)
            loss_mask = batch.completion_mask.bool() & valid_rows(batch.truncated, cfg.truncation)[:, None]
            scorer = ScoreInLoss(batch, cfg) if in_loss else None
            policy.train()
            for _ in range(cfg.updates_per_batch):
                optimizer.zero_grad(set_to_none=True)
                stats = policy_gradient_pass(policy, batch, old_logprobs, ref_logprobs,
                                             None if in_loss else scores.advantages, loss_mask, cfg, dd, autocast,
                                             score_in_loss=scorer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in policy.parameters() if p.requires_grad], cfg.max_grad_norm
                ).item()
                if not math.isfinite(grad_norm):  # NaN log-probs (a NaN in the model) must not reach the weights
                    raise FloatingPointError(
                        f"step {step}: the gradient norm is {grad_norm}; NaN or inf in the model's log-probs or "
                        "loss, so no update was applied (see metrics.jsonl for the last good step)"
                    )
                lr = optimizer.param_groups[0]["lr"]  # the rate this update used
                optimizer.step()
            scheduler.step()
            scores = scorer.scores if in_loss else scores
        step_time = time.perf_counter() - t0

        # 6. evaluation on the held-out sets (step 0 was before the loop), best model, early stop
        eval_metrics = {}
        if suite is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            eval_metrics = evaluation(step, policy, tokenizer, suite, output_dir, timer, dd, selection, bar)
            stopped = dd.rank0_flag(selection.should_stop)

        # 7. metrics over all ranks
        completions = [row[m].tolist() for row, m in zip(batch.input_ids, batch.completion_mask.bool())]
        row = step_metrics(step, batch, scores, completions, stats, grad_norm=grad_norm, lr=lr, step_time=step_time,
                           dd=dd)
        tokens = row["tokens"]
        stage_tokens = {"rollout": row["generated_tokens"], "score": 0.0 if in_loss else tokens,
                        "reference": tokens if reference is not None else 0.0, "update": tokens * cfg.updates_per_batch}
        row.update({"peak_mem_mb": peak_memory_mb(device),  # rank 0's
                    "data_position": stream.position, **timing_metrics(timer.seconds, stage_tokens), **eval_metrics})
        rows.append(row)
        logger.metrics(row)
        if cfg.log_completions_every and step % cfg.log_completions_every == 0:
            logger.completions([
                {"step": step, "prompt": str(stream.prompts[indices[int(batch.prompt_index[j])]]),
                 "completion": tokenizer.decode(completions[j], skip_special_tokens=True),
                 "reward": scores.rewards[j].item(), "truncated": bool(batch.truncated[j])}
                for j in range(len(batch))
            ])
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"reward {row['reward_mean']:.3f} entropy {row['entropy_mean']:.3f} "
                                f"kl {row['kl']:.1e} | {stage_split(row)}")
        if stopped and dd.main:
            print(f"early stop at step {step}: {selection.describe()}", flush=True)
        if step % cfg.save_every == 0 or step == cfg.steps or stopped:
            save_checkpoint(output_dir, step, policy, optimizer, scheduler, stream, cfg, dd, selection)

    if bar is not None:
        bar.close()
    logger.close()
    last = rows[-1]["step"] if rows and "reward_mean" in rows[-1] else start
    if dd.main and (last == cfg.steps or stopped or selection.should_stop):
        # The run is complete: final/ holds its model. A resumed complete run whose final/ was lost (a crash
        # after the last checkpoint) rebuilds it from that checkpoint's weights, now loaded.
        if last > start:
            save_model(policy, tokenizer, output_dir / "final")
        elif not recover_dir(output_dir / "final"):
            print(f"the run is complete at step {start}; rebuilding {output_dir / 'final'} from its checkpoint",
                  flush=True)
            save_model(policy, tokenizer, output_dir / "final")
        elif start == cfg.steps:
            print(f"nothing to do: the run is complete at step {start} and {output_dir / 'final'} is intact",
                  flush=True)
    return rows


def restore_best(output_dir: Path, policy, tokenizer, selection: BestTracker, step: int) -> None:
    """``best/`` after a crash: restored from an interrupted save's copies, else rebuilt when the best step is
    the checkpoint just loaded; otherwise it will be written again at the next new best (warned)."""
    if selection.best_step is None or recover_dir(output_dir / "best"):
        return
    if selection.best_step == step:
        print(f"rebuilding {output_dir / 'best'} (step {step}) from its checkpoint", flush=True)
        save_best(output_dir, policy, tokenizer, selection)
    else:
        warnings.warn(f"{output_dir / 'best'} is missing and step {selection.best_step}'s weights are in no "
                      "checkpoint: it is written again at the next new best", stacklevel=2)
