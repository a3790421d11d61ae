"""An interrupted run, resumed from its checkpoint, continues exactly as the uninterrupted run."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

import sirl.checkpoint as checkpoint_mod  # noqa: E402
import sirl.rollout.hf as rollout_hf  # noqa: E402
import sirl.train as train_mod  # noqa: E402
from sirl.config import load_config  # noqa: E402

TIMING = {"tokens_per_s", "step_time_s", "peak_mem_mb"}


def config(out):
    return load_config(preset="tiny", overrides=dict(
        steps=4, save_every=2, max_new_tokens=6, lr=1e-2, lora=True, lora_r=4, lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"], lr_schedule="cosine", warmup_steps=1, kl_beta=0.01,
        output_dir=str(out), progress=False, log_completions_every=1,
    ))


def record_batches(monkeypatch):
    batches = []
    real = rollout_hf.generate_rollout

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        batches.append(out.input_ids.clone())
        return out

    monkeypatch.setattr(rollout_hf, "generate_rollout", recording)
    return batches


def metrics(path):
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("time/")} for r in rows]


def test_resume_after_a_crash_mid_save_reproduces_the_run(tmp_path, monkeypatch):
    full_batches = record_batches(monkeypatch)
    train_mod.train(config(tmp_path / "full"))
    full = metrics(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]

    # Interrupted run: the final save (step 4) dies half-way, after metrics of steps 3-4 were written.
    monkeypatch.undo()
    real_save = checkpoint_mod._save_tensors

    def dying_save(tensors, path):
        if "checkpoint-0000004" in str(path):
            raise KeyboardInterrupt("killed mid-save")
        return real_save(tensors, path)

    monkeypatch.setattr(checkpoint_mod, "_save_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(config(tmp_path / "cut"))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert (cut / "checkpoint-0000004.tmp").exists() and not (cut / "checkpoint-0000004").exists()
    assert (cut / "checkpoint-0000002" / "trainable.safetensors").exists()  # the previous checkpoint is intact
    assert len(metrics(cut)) == 4

    resumed_batches = record_batches(monkeypatch)
    train_mod.train(config(cut), resume=True)
    rows = metrics(cut)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # lines past the checkpoint were dropped, then rewritten
    assert len(resumed_batches) == 2
    assert torch.equal(resumed_batches[0], full_batches[2])  # the same next batch
    assert torch.equal(resumed_batches[1], full_batches[3])
    for a, b in zip(rows, full):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    steps = [json.loads(x)["step"] for x in (cut / "completions.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 16  # 4 prompts x G=4, not duplicated by the resume
    from safetensors.torch import load_file

    ckpt = load_file(cut / "checkpoint-0000004" / "trainable.safetensors")
    assert ckpt and all("lora" in k for k in ckpt)  # only the adapter is trained and saved


def test_resume_without_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_mod.train(config(tmp_path / "empty"), resume=True)
