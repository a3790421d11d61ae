"""parallel=fsdp on CPU: FSDP2 over gloo ranks gives the single process's log-probs and gradients, its sharded
checkpoints resume exactly and load with another number of ranks, and the fused head goes through FSDP's hooks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMING = ("time/", "step_time_s", "tokens_per_s", "peak_mem_mb")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sharded_passes_equal_one_process(tmp_path, lora):
    """Each rank scores and trains on half the batch with the sharded model: its log-probs and entropies are the
    unsharded model's (the fused head's output included), and after the backward's reduce-scatter the full
    gradient equals the single process's on the whole batch (fp32, summed in another order: rtol 1e-5)."""
    if not (tmp_path / "fsdp0-rank0.pt").exists():
        torch.multiprocessing.spawn(fsdp_worker.run, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    from sirl.dist import Dist

    one = fsdp_worker.passes(Dist(), slice(0, 8), lora, shard=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"fsdp{int(lora)}-rank{rank}.pt", weights_only=True)
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(got["logprobs"], one["logprobs"][rows], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["entropy"], one["entropy"][rows], rtol=1e-6, atol=1e-6)
        assert got["grads"].keys() == one["grads"].keys()
        for name, g in one["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
        for key in ("loss", "kl", "clip_frac"):
            assert got["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5, abs=1e-8)
    head = "base_model.model.lm_head.weight" if lora else "lm_head.weight"
    if not lora:  # the fused head's weight really is trained through the sharded root
        assert one["grads"][head].abs().sum() > 0


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    return subprocess.run([sys.executable, *(launcher if nproc > 1 else []), "-m", "sirl.cli", "train", *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.slow
def test_torchrun_fsdp_trains_checkpoints_resumes_and_reshards(tmp_path):
    """torchrun with 2 ranks: 3 steps, then a resume to 4, give the metrics and weights of 4 uninterrupted steps;
    the sharded checkpoint also loads in one process (another number of ranks)."""
    settings = ["--preset", "tiny", "parallel=fsdp", "save_every=1", "max_new_tokens=5", "progress=false",
                "log_completions_every=0", "kl_beta=0.01"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = torchrun(*settings, "--steps", "4", "--output-dir", str(full))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parallel=fsdp" in done.stdout and "fp32 shards" in done.stdout  # the memory plan, printed at start
    done = torchrun(*settings, "--steps", "3", "--output-dir", str(cut))
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = cut / "checkpoint-0000003"
    assert sorted(p.name for p in ckpt.glob("shard-*.safetensors")) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (ckpt / "optim.pt").exists() and (ckpt / "optim_groups.json").exists()
    done = torchrun(*settings, "--steps", "4", "--output-dir", str(cut), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(cut) == metrics(full)
    from safetensors.torch import load_file

    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # one process loads the 2-rank checkpoint of step 4 (its shards resharded into whole tensors) and goes on
    one = tmp_path / "one"
    os.makedirs(one)
    import shutil

    shutil.copytree(full / "checkpoint-0000004", one / "checkpoint-0000004")
    shutil.copy(full / "metrics.jsonl", one)
    done = torchrun(*settings, "--steps", "5", "--output-dir", str(one), "--resume", nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds no RNG state for rank" not in done.stderr  # rank 0's state is there
    assert [r["step"] for r in metrics(one)] == [1, 2, 3, 4, 5]
