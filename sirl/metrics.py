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
