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

import json
import math
import os
import random
import resource
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sirl.advantage import group_advantages
from sirl.config import ConfigError, SIRLConfig, check_resume_changes, reward_in_loss, save_config
from sirl.data import PromptStream, encode_prompt, load_prompts
from sirl.eval.report import distinct_n
from sirl.eval.suite import EvalSuite, check_keep_best, evaluate, load_llm_judge, load_suite
from sirl.loss import sirl_loss
from sirl.models import active_dropout
from sirl.reference import Reference, is_peft_model, reference_logprobs
from sirl.rollout import Rollout, rollout
from sirl.score import micro_batches, sirl_rewards, token_logprobs_entropy, trim, valid_rows
from sirl.selection import BestTracker
from sirl_kernels import validate_labels
from sirl_kernels.hf import causal_lm_token_logprobs_entropy, output_head, unwrap_model

# ---------------------------------------------------------------------------------------------------------------
# distributed helpers (all no-ops in a single process)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    # Where the tensors of a collective live: NCCL (the backend on CUDA) only reduces CUDA tensors, gloo CPU ones.
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, on this rank's collective device (``t`` itself in a single process)."""
        if self.world == 1:
            return t
        t = t.to(self.device, torch.float64)
        dist.all_reduce(t)
        return t

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        return self.all_sum_tensor(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def all_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks in rank order (every rank holds the same number of rows)."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def rank0_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. rank 0's evaluation decided to stop)."""
        return self.all_sum([float(flag) if self.main else 0.0])[0] > 0

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


# Rank 0 evaluates while the other ranks wait in a barrier: an evaluation (generation on every held-out set, an
# LLM judge) can outlast NCCL's default 10-minute collective timeout, which would abort the waiting ranks.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def init_distributed(device: torch.device) -> Dist:
    """The process group under torchrun (NCCL when ``device`` is CUDA, else gloo); a single-process Dist without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's barrier and communicators use the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if dist.is_initialized():
        collective = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return Dist(dist.get_rank(), dist.get_world_size(), collective)
    return Dist()


def pick_device(cfg: SIRLConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------------
# stage timings: where a step's time goes (generation usually dominates)

STEP_STAGES = ("rollout", "score", "reference", "update")  # of one training step (bench_trainer, sirl plot)
STAGES = STEP_STAGES + ("eval",)


class StageTimer:
    """Wall seconds per stage; on CUDA each stage ends with a synchronize so its kernels are counted in it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - t0


def timing_metrics(seconds: dict, tokens: dict) -> dict:
    """``time/STAGE_s`` for every stage, and ``time/STAGE_tokens_per_s`` for each stage given a token count
    (rollout: generated tokens; score, reference: prompt + completion tokens; update: those times mu)."""
    out = {f"time/{stage}_s": seconds.get(stage, 0.0) for stage in STAGES}
    for stage, count in tokens.items():
        out[f"time/{stage}_tokens_per_s"] = count / seconds[stage] if seconds.get(stage) else 0.0
    return out


def stage_split(row: dict) -> str:
    """The progress bar's view of a row's timings: ``roll 12.1s score 0.9s ref 0.8s upd 3.0s eval 0.0s``."""
    short = {"rollout": "roll", "score": "score", "reference": "ref", "update": "upd", "eval": "eval"}
    return " ".join(f"{short[s]} {row[f'time/{s}_s']:.3g}s" for s in STAGES)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: written to a temporary directory, then renamed, so a crash mid-save leaves the previous one intact


def rng_state() -> dict:
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a ``.tmp`` directory is an interrupted save and never counts)."""
    return sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()),
                  key=lambda p: int(p.name.split("-")[1]))


def replace_dir(tmp: Path, final: Path) -> None:
    """Puts the finished directory ``tmp`` at ``final``, keeping the old one until the new one is in place."""
    if final.exists():
        final.rename(final.with_name(final.name + ".old"))
    os.replace(tmp, final)  # atomic on POSIX: the directory exists whole or not at all
    shutil.rmtree(final.with_name(final.name + ".old"), ignore_errors=True)


def save_checkpoint(output_dir: Path, step: int, policy, optimizer, scheduler, stream, cfg, dd: Dist,
                    selection: BestTracker) -> None:
    final = output_dir / f"checkpoint-{step:07d}"
    tmp = output_dir / f"checkpoint-{step:07d}.tmp"
    if dd.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dd.world > 1:
        dist.barrier()
    # Each rank samples with its own RNG stream: each saves its own.
    torch.save(rng_state(), tmp / f"rng_rank{dd.rank}.pt")
    if dd.main:
        torch.save(trainable_state(policy), tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "data": stream.state_dict(),
                                                    "selection": selection.state_dict()}))
        save_config(cfg, tmp / "config.json")
    if dd.world > 1:
        dist.barrier()
    if dd.main:
        replace_dir(tmp, final)  # a step saved twice (early stop at a save_every step) keeps one copy
        for old in checkpoint_dirs(output_dir)[: -max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    if dd.world > 1:
        dist.barrier()


def load_checkpoint(path: Path, policy, optimizer, scheduler, stream, dd: Dist) -> dict:
    """Restores weights, optimizer, schedule, data position and RNGs; returns the checkpoint's ``state.json``."""
    weights = torch.load(path / "trainable.pt", map_location="cpu")
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    state = json.loads((path / "state.json").read_text())
    stream.load_state_dict(state["data"])
    rng_file = path / f"rng_rank{dd.rank}.pt"
    if not rng_file.exists():
        raise RuntimeError(f"{path} was written with a different number of ranks (no {rng_file.name})")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def apply_optimizer_settings(optimizer, scheduler, cfg: SIRLConfig) -> None:
    """Makes a restored optimizer and schedule follow ``cfg`` (a resume may change lr, betas, weight decay,
    warm-up or schedule under --allow-config-change; with the saved settings this changes nothing)."""
    scheduler.lr_lambdas = [lr_lambda(cfg)] * len(optimizer.param_groups)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * fn(scheduler.last_epoch), weight_decay=cfg.weight_decay,
                     betas=(cfg.adam_beta1, cfg.adam_beta2))


def save_pretrained(policy, tokenizer, path: Path) -> None:
    """The adapter (LoRA) or the whole model, loadable with from_pretrained, written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_peft_model(policy):
        # peft's "auto" would look the base model up on the Hub (base_model_name_or_path is the user's name for
        # it) to decide whether to save the embeddings: save them exactly when training touched them.
        trained_embeddings = any(p.requires_grad and ("embed" in n or "lm_head" in n)
                                 for n, p in policy.named_parameters())
        policy.save_pretrained(tmp, save_embedding_layers=trained_embeddings)
    else:
        policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)


def save_best(output_dir: Path, policy, tokenizer, selection: BestTracker) -> None:
    save_pretrained(policy, tokenizer, output_dir / "best")
    (output_dir / "best" / "best.json").write_text(json.dumps(
        {"step": selection.best_step, "metric": selection.metric, "mode": selection.mode,
         "value": selection.best_value}, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# logging


class Logger:
    """metrics.jsonl (+ TensorBoard when asked and installed) + completions.jsonl, written by rank 0 only."""

    def __init__(self, output_dir: Path, cfg: SIRLConfig, dd: Dist, resume_step: int):
        self.enabled = dd.main
        self.metrics_path = output_dir / "metrics.jsonl"
        self.completions_path = output_dir / "completions.jsonl"
        self.tb = None
        if not self.enabled:
            return
        # A crash after logging but before checkpointing leaves lines the resumed run will write again.
        for path in (self.metrics_path, self.completions_path):
            if path.exists():
                lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
                kept = [ln for ln in lines if json.loads(ln)["step"] <= resume_step]
                path.write_text("".join(ln + "\n" for ln in kept))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only")

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def completions(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.completions_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        if self.tb is not None and rows:
            text = "\n\n".join(f"**reward {r['reward']:.3f}** | {r['prompt']} -> {r['completion']}" for r in rows)
            self.tb.add_text("completions", text, rows[0]["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def log_config_changes(output_dir: Path, step: int, changes: dict) -> None:
    """A resume's accepted config changes, printed and appended to ``config_changes.jsonl``."""
    if not changes:
        return
    print(f"--resume at step {step} applies config changes: "
          + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()), flush=True)
    with open(output_dir / "config_changes.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# the loop


def build(cfg: SIRLConfig, dd: Dist):
    """Model (+ LoRA), tokenizer, reference, optimizer, schedule and prompt stream, all seeded."""
    from sirl.models import add_lora, load_model_and_tokenizer

    device = pick_device(cfg)
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
    stream = PromptStream(load_prompts(cfg.prompts, cfg.prompt_column, cfg.dataset_split), cfg.seed, cfg.shuffle)
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
        if dd.world > 1:
            dist.barrier()
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


def train(cfg: SIRLConfig, resume: bool = False, allow_config_change: bool = False) -> list[dict]:
    """Runs ``cfg.steps`` steps (continuing from the latest checkpoint when ``resume``); returns the metric rows.

    Everything that can be checked without a model is checked first: the config, the evaluation sets (and that
    ``keep_best`` names a metric they give) and, on ``resume``, the differences from the run's saved config (only
    ``MAY_CHANGE_ON_RESUME`` keys may differ unless ``allow_config_change``; then every change is logged and
    applied, the optimizer's lr included)."""
    cfg.validate()
    dd = init_distributed(pick_device(cfg))
    if cfg.prompts_per_step % dd.world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {dd.world} ranks")
    output_dir = Path(cfg.output_dir)
    found = checkpoint_dirs(output_dir) if output_dir.is_dir() else []
    if not resume and found:
        raise FileExistsError(f"{output_dir} already holds checkpoints: pass --resume, or pick a new --output-dir")
    if resume and not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir}")
    changes = check_resume_changes(json.loads((found[-1] / "config.json").read_text()), cfg,
                                   allow_config_change) if resume else {}
    suite = load_suite(cfg)
    check_keep_best(cfg, suite)  # against the suite's attack names as resolved (e.g. columns -> column:NAME)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Same seed everywhere for the model and data order; per-rank offset only for sampling (set below).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    policy, tokenizer, reference, optimizer, scheduler, stream, device = build(cfg, dd)
    in_loss = reward_from_loss_pass(cfg, policy, dd)  # the reward from the training forward: no separate pass
    torch.manual_seed(cfg.seed + 1000 * dd.rank)
    if suite is not None and dd.main:  # only rank 0 evaluates
        load_llm_judge(suite, device, cfg.dtype)
    selection = BestTracker(cfg.keep_best, cfg.keep_best_mode, cfg.early_stop_patience)

    start = 0
    if resume:
        state = load_checkpoint(found[-1], policy, optimizer, scheduler, stream, dd)
        start = int(state["step"])
        selection.load_state_dict(state.get("selection"))
        apply_optimizer_settings(optimizer, scheduler, cfg)
        if dd.main:
            log_config_changes(output_dir, start, changes)
    if dd.main:
        save_config(cfg, output_dir / "config.json")  # only now: the settings this run goes on with
    logger = Logger(output_dir, cfg, dd, start)
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
    if dd.main and rows and rows[-1]["step"] > start:
        save_pretrained(policy, tokenizer, output_dir / "final")
    return rows
