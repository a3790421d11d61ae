"""Runs ``sirl train`` and SIGKILLs it at one phase of one step: what a power cut or an OOM killer does.

    python scripts/kill_harness.py PHASE STEP -- [sirl train arguments ...]

The process kills itself with SIGKILL (no cleanup, no ``finally``) exactly where a crash hurts most:

    metrics-line      half of step STEP's line of metrics.jsonl is on the disk
    completions-line  half of step STEP's rows of completions.jsonl are on the disk
    checkpoint-file   checkpoint-STEP.tmp holds half of optim.pt (its weights and RNG states are written)
    checkpoint-swap   checkpoint-STEP.tmp is complete with its manifest, not yet renamed into place
    best-write        best.tmp of the evaluation at step STEP is written but has no manifest yet
    best-swap         the old best/ is renamed to best.old, the new one is still best.tmp
    final-write       final.tmp is written but has no manifest yet (STEP: the run's last step)

Used by tests/sirl/test_crash_safety.py, which resumes each killed run with ``--resume`` and compares it with an
uninterrupted one. This is a test tool: it patches the trainer's file writers from outside the package.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

PHASES = ("metrics-line", "completions-line", "checkpoint-file", "checkpoint-swap", "best-write", "best-swap",
          "final-write")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def write_half_and_die(path: Path, data: bytes, mode: str = "ab") -> None:
    with open(path, mode) as f:
        f.write(data[: max(1, len(data) // 2)])
        f.flush()
        os.fsync(f.fileno())
    die()


def install(phase: str, step: int) -> None:
    import json

    import sirl.checkpoint as checkpoint
    import sirl.metrics as metrics
    import torch

    if phase in ("metrics-line", "completions-line"):
        target = metrics.METRICS if phase == "metrics-line" else metrics.COMPLETIONS
        real_append = metrics.append_lines

        def append_lines(path, rows):
            rows = list(rows)
            if Path(path).name == target and rows and rows[0].get("step") == step:
                write_half_and_die(Path(path), "".join(json.dumps(r) + "\n" for r in rows).encode())
            real_append(path, rows)

        metrics.append_lines = append_lines
    elif phase == "checkpoint-file":
        real_save = checkpoint._torch_save

        def torch_save(obj, path):
            if Path(path).parent.name == f"{checkpoint.PREFIX}{step:07d}.tmp":
                import io

                buffer = io.BytesIO()
                torch.save(obj, buffer)
                write_half_and_die(Path(path), buffer.getvalue(), "wb")
            real_save(obj, path)

        checkpoint._torch_save = torch_save
    elif phase in ("checkpoint-swap", "best-swap"):
        real_replace = checkpoint.replace_dir
        name = f"{checkpoint.PREFIX}{step:07d}" if phase == "checkpoint-swap" else "best"

        def replace_dir(tmp, final):
            if Path(final).name == name and (phase == "checkpoint-swap" or _best_step(tmp) == step):
                if Path(final).exists():
                    Path(final).rename(Path(final).with_name(Path(final).name + ".old"))
                die()
            real_replace(tmp, final)

        checkpoint.replace_dir = replace_dir
    elif phase in ("best-write", "final-write"):
        real_manifest = checkpoint.write_manifest
        name = "best.tmp" if phase == "best-write" else "final.tmp"

        def write_manifest(directory, extra=None):
            if Path(directory).name == name and (phase == "final-write" or _best_step(directory) == step):
                die()
            real_manifest(directory, extra)

        checkpoint.write_manifest = write_manifest
    else:
        raise SystemExit(f"kill_harness: unknown phase {phase!r}; one of {', '.join(PHASES)}")


def _best_step(directory) -> int | None:
    import json

    path = Path(directory) / "best.json"
    return json.loads(path.read_text())["step"] if path.exists() else None


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit(__doc__)
    phase, step, train_args = argv[0], int(argv[1]), argv[3:]
    install(phase, step)
    from sirl.cli import main as cli_main

    return cli_main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
