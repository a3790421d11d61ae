"""What a run records: the metrics and completions logs, the time of each stage, one step's metrics.

``metrics.jsonl`` and ``completions.jsonl`` are append-only JSON-lines logs written by rank 0. A resumed run reads
them before any model loads (a bad line is an error naming file and line; a torn last line, left by a crash
mid-write, is cut off with a warning) and drops the rows past its checkpoint, which it is about to write again.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sirl.eval.report import distinct_n
from sirl.files import append_lines, keep_log_rows, read_log

METRICS = "metrics.jsonl"
COMPLETIONS = "completions.jsonl"
LOGS = (METRICS, COMPLETIONS)


def check_logs(output_dir: Path) -> None:
    """Reads every log of a run about to resume, so a corrupt one stops it before any model loads."""
    for name in LOGS:
        if (output_dir / name).exists():
            read_log(output_dir / name)


def read_metrics(output_dir: Path) -> list[dict]:
    """The rows of ``OUTPUT_DIR/metrics.jsonl`` (``sirl plot``, ``sirl eval compare``)."""
    return read_log(Path(output_dir) / METRICS)


class Logger:
    """metrics.jsonl (+ TensorBoard when asked and installed) + completions.jsonl, written by rank 0 only."""

    def __init__(self, output_dir: Path, tensorboard: bool, main: bool, resume_step: int):
        self.enabled = main
        self.metrics_path = output_dir / METRICS
        self.completions_path = output_dir / COMPLETIONS
        self.tb = None
        if not self.enabled:
            return
        # A crash after logging but before checkpointing leaves rows the resumed run will write again.
        for path in (self.metrics_path, self.completions_path):
            if path.exists():
                keep_log_rows(path, lambda row: isinstance(row.get("step"), int) and row["step"] <= resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only")

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        append_lines(self.metrics_path, [row])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def completions(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        append_lines(self.completions_path, rows)
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
    append_lines(output_dir / "config_changes.jsonl", [{"step": step, "changes": {k: list(v) for k, v in changes.items()}}])


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------------
# one step's metrics


def step_metrics(step: int, batch, scores, completions: list[list[int]], stats: dict, *, grad_norm: float,
                 lr: float, step_time: float, dd) -> dict:
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
    row = {
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
        "outside_support_frac": stats["outside_support_frac"],
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
    for name, values in scores.extra.items():  # varentropy, self-certainty: per-sequence means over the completion
        per_seq = dd.all_cat((values * mask).sum(-1) / mask.sum(-1).clamp_min(1))
        row[f"{name}_mean"] = per_seq.mean().item()
    if batch.sampler_logprobs is not None:
        row.update(sampler_mismatch(batch.sampler_logprobs, scores.logprobs, mask, dd))
    return row


def sampler_mismatch(sampler: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor, dd) -> dict:
    """How far the rollout engine's log-probs of the sampled tokens are from the trainer's, over the completion
    tokens of all ranks: the mean and max absolute difference, and KL(sampler || trainer) estimated from the
    sampler's own samples with Schulman's k3 (``exp(d) - d - 1``, ``d = log p_trainer - log p_sampler``: unbiased
    and never negative). Tokens the trainer gives probability 0 (``-inf``: outside its sampler support, counted by
    ``outside_support_frac``) are left out: their difference and KL are infinite."""
    d = (trainer.double() - sampler.double())[mask & ~torch.isneginf(trainer)]
    k3 = torch.expm1(d.clamp(max=50.0)) - d
    count, abs_sum, k3_sum = dd.all_sum([float(d.numel()), float(d.abs().sum()), float(k3.sum())])
    local_max = torch.tensor([float(d.abs().max()) if d.numel() else 0.0], dtype=torch.float64)
    largest = float(dd.all_cat(local_max).max())
    return {"rollout/logprob_diff_mean": abs_sum / max(count, 1.0), "rollout/logprob_diff_max": largest,
            "rollout/kl_sampler_trainer": k3_sum / max(count, 1.0)}
