"""benchmarks/bench_trainer.py end to end on the tiny random model: three trainer processes, one step each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed")
pytest.importorskip("peft", reason="peft is not installed")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_trainer.py"


@pytest.mark.slow
def test_bench_trainer_runs_all_three_trainers(tmp_path):
    subprocess.run([sys.executable, str(BENCH), "--model", "tiny-random-llama", "--steps", "1", "--warmup", "0",
                    "--rounds", "1", "--max-new-tokens", "4", "--out-dir", str(tmp_path)], check=True,
                   capture_output=True)
    data = json.loads((tmp_path / "bench_trainer.json").read_text())
    rows = {r["trainer"]: r for r in data["rows"]}
    assert set(rows) == {"ours", "trl", "trl+sirl"} and data["meta"]["setup"]["gradient_checkpointing"] is True
    for r in rows.values():
        assert r["n_steps"] == 1 and r["step_s"] > 0 and r["rollout_s"] > 0 and r["update_s"] > 0
        assert r["reference_s"] > 0 and r["train_peak_rss_mb"] > 0 and r["tokens_per_s"] > 0
        assert r["rollout_s"] + r["score_s"] + r["reference_s"] <= r["step_s"]
    assert rows["ours"]["score_s"] == 0 and rows["trl+sirl"]["sirl_reward_pass"] == "loss"
    assert rows["trl"]["score_s"] > 0  # plain TRL's reward function runs its own forward
    assert rows["ours"]["step_vs_ours"] == 1 and "| trl+sirl |" in (tmp_path / "bench_trainer.md").read_text()


@pytest.mark.slow
def test_bench_trainer_parallel_times_ddp_against_fsdp(tmp_path):
    subprocess.run([sys.executable, str(BENCH), "--parallel", "--model", "tiny-random-llama", "--steps", "1",
                    "--warmup", "0", "--rounds", "1", "--max-new-tokens", "4", "--out-dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    data = json.loads((tmp_path / "bench_parallel.json").read_text())
    rows = {r["parallel"]: r for r in data["rows"]}
    assert set(rows) == {"ddp", "fsdp"} and rows["ddp"]["step_vs_ddp"] == 1
    assert all(r["step_s"] > 0 and r["peak_rss_mb"] > 0 and r["ranks"] == 2 for r in rows.values())
