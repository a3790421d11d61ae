"""sirl train --dry-run and the memory plan: built on the meta device from a real config, no weights, nothing
written; the per-rank figures follow from the parameter count."""

import json

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")

import sirl.models  # noqa: E402
from sirl.cli import main  # noqa: E402

GIB = 2**30


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(sirl.models, "load_model_and_tokenizer", refuse)


def figures(out: str) -> dict:
    return {line.rsplit(None, 2)[0].strip(): float(line.rsplit(None, 2)[1]) for line in out.splitlines()
            if line.endswith(" GiB")}


def test_the_paper_preset_dry_run_plans_llama_8b_on_8_ranks_without_weights(capsys, no_weights, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "paper", "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "8.03B parameters (8.03B trained), 8 rank(s), parallel=fsdp" in out
    assert "LlamaForCausalLM from llama-3.1-8b-instruct.config.json: hidden 4096, 32 layers, vocabulary 128256" in out
    assert "512 prompts x G=4 = 2048 sequences of <= 1024 + 3072 tokens" in out
    params = 8_030_261_248  # Llama-3.1-8B: 32 layers of 218.1M + 2 x 525.3M embeddings + the final norm
    rows = figures(out)
    assert rows["parameters (fp32 shards)"] == pytest.approx(params * 4 / 8 / GIB, abs=0.006)
    assert rows["optimizer (AdamW moments)"] == pytest.approx(2 * params * 4 / 8 / GIB, abs=0.006)
    assert rows["full copy (sampling, evaluation)"] == pytest.approx(params * 2 / GIB, abs=0.006)  # bf16
    assert rows["total"] == pytest.approx(sum(v for k, v in rows.items() if k != "total"), abs=0.05)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_dry_run_with_an_8b_shaped_config_file_and_lora_on_one_rank(capsys, no_weights, tmp_path):
    from sirl.presets import PRESET_DIR

    config = json.loads((PRESET_DIR / "llama-3.1-8b-instruct.config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "num_hidden_layers": 2}))
    assert main(["train", "--preset", "paper", "--dry-run", f"model_config={path}", "lora=true", "lora_r=8",
                 "parallel=ddp", "kl_beta=0.001", "rollout_engine=hf"]) == 0
    out = capsys.readouterr().out
    assert "1 rank(s), parallel=ddp" in out and "2 layers" in out
    assert "reference" not in out  # LoRA: the reference is the model with its adapters off
    rows = figures(out)
    assert rows["parameters"] > 2 * rows["gradients"]  # only the adapters are trained


def test_dry_run_refuses_what_a_run_would_refuse(capsys, no_weights, tmp_path):
    assert main(["train", "--preset", "paper", "--dry-run", "prompts=nope.jsonl"]) == 2
    assert "prompts=nope.jsonl: no such file" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--world-size", "2", "--output-dir", str(tmp_path / "r")]) == 2
    assert "--world-size only applies with --dry-run" in capsys.readouterr().err
