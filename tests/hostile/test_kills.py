"""SIGKILL at every phase of a run's writes, then ``--resume``: the result equals the uninterrupted run's.

Each killed run is ``scripts/kill_harness.py`` (the trainer with its file writers patched to SIGKILL the process
half-way, from outside the package); the resumed run and the uninterrupted one are plain ``sirl train`` processes
with the same settings and one thread, so every number can be compared exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "scripts" / "kill_harness.py"
ARGS = ["--preset", "tiny", "--steps", "4", "save_every=2", "lora=true", "lora_r=4", "eval_every=2",
        "eval_harmful=eval_harmful_cpu_demo.jsonl", "eval_overrefusal=overrefusal_cpu_demo.jsonl", "eval_limit=2",
        "eval_max_new_tokens=4", "keep_best=eval/entropy", "keep_best_mode=min", "log_completions_every=1",
        "max_new_tokens=6", "progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
TIMING = ("time/", "step_time_s", "tokens_per_s", "peak_mem_mb")


def sirl(*args: str, harness: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    prefix = [str(HARNESS), harness[0], str(harness[1]), "--"] if harness else ["-m", "sirl.cli", "train"]
    return subprocess.run([sys.executable, *prefix, *args], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def record(out: Path) -> dict:
    """Everything a run leaves that must not depend on a crash: metrics (timings aside), completions, the final
    and best models, the best step."""
    rows = [{k: v for k, v in json.loads(ln).items() if not k.startswith(TIMING)}
            for ln in (out / "metrics.jsonl").read_text().splitlines()]
    completions = (out / "completions.jsonl").read_text().splitlines()
    return {"metrics": rows, "completions": completions,
            "final": load_file(out / "final" / "adapter_model.safetensors"),
            "best": load_file(out / "best" / "adapter_model.safetensors"),
            "best.json": json.loads((out / "best" / "best.json").read_text())}


def same(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["completions"] == b["completions"]
    assert a["best.json"] == b["best.json"]
    for key in ("final", "best"):
        assert a[key].keys() == b[key].keys()
        assert all(a[key][k].equal(b[key][k]) for k in a[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full") / "run"
    done = sirl(*ARGS, "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    result = record(out)
    assert result["best.json"]["step"] == 4, "the kill points below assume a new best at the last evaluation"
    return result


# Every phase of one run's writes, in the order a run reaches them: each process resumes what the previous one
# left and is killed at the next phase; the last one finishes. Chained, the 7 kills cost 8 processes, not 14.
CHAIN = [("metrics-line", 3), ("completions-line", 3), ("best-write", 4), ("best-swap", 4), ("checkpoint-file", 4),
         ("checkpoint-swap", 4), ("final-write", 4)]


def test_a_kill_at_every_phase_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    for i, (phase, step) in enumerate(CHAIN):
        killed = sirl(*ARGS, "--output-dir", str(out), *(["--resume"] if i else []), harness=(phase, step))
        assert killed.returncode == -9, (phase, killed.stderr)  # SIGKILL: nothing was cleaned up
        if phase == "completions-line":  # the previous process tore metrics.jsonl; this one cut it off
            assert f"warning: {out / 'metrics.jsonl'}: dropped a torn last line" in killed.stderr
    resumed = sirl(*ARGS, "--output-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "rebuilding" in resumed.stdout  # final.tmp had no manifest: final/ is rebuilt from checkpoint 4
    same(record(out), uninterrupted)
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old", ".partial")))
    assert leftovers == []

    again = sirl(*ARGS, "--output-dir", str(out), "--resume")
    assert again.returncode == 0 and "nothing to do: the run is complete at step 4" in again.stdout
    for name in ("final", "best"):  # both lost: rebuilt from the last checkpoint (step 4 is also the best)
        for p in sorted((out / name).iterdir()):
            p.unlink()
        (out / name).rmdir()
    rebuilt = sirl(*ARGS, "--output-dir", str(out), "--resume")
    assert rebuilt.returncode == 0, rebuilt.stderr
    same(record(out), uninterrupted)
