"""Hostile run directories: torn and corrupt logs, another run's files, damaged or tampered checkpoints, an
unwritable directory and a full disk. Each gets one line naming the file (and line), or a fallback that says what
it skipped; nothing a run wrote is ever deleted or silently overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

import sirl.checkpoint as checkpoint  # noqa: E402
import sirl.models  # noqa: E402
from sirl.cli import main, plot  # noqa: E402
from sirl.files import read_log, write_manifest  # noqa: E402

SETTINGS = ["--preset", "tiny", "progress=false", "max_new_tokens=4", "lora=true", "lora_r=4", "save_every=1",
            "keep_checkpoints=3", "log_completions_every=1"]


def train(out: Path, *args: str) -> int:
    return main(["train", *SETTINGS, "--output-dir", str(out), *args])


def error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sirl ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out, "--steps", "3") == 0
    return out


@pytest.fixture
def run(three_steps, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    return out


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad file was reported")

    monkeypatch.setattr(sirl.models, "load_model_and_tokenizer", refuse)


def steps(out: Path) -> list[int]:
    return [r["step"] for r in read_log(out / "metrics.jsonl")]


# ---- logs --------------------------------------------------------------------------------------------------------

def test_a_corrupt_line_inside_a_log_is_an_error_naming_file_and_line_before_the_model(run, capsys, no_model):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert train(run, "--steps", "4", "--resume") == 2
    assert f"{run / 'metrics.jsonl'}, line 2: not valid JSON" in error_line(capsys)
    config = (run / "config.json").read_text()
    assert (run / "config.json").read_text() == config  # nothing rewritten


def test_a_torn_last_line_is_cut_off_with_a_warning(run, capsys):
    with open(run / "completions.jsonl", "a") as f:
        f.write('{"step": 4, "prompt": "unfinished')
    with pytest.warns(UserWarning, match=f"{run / 'completions.jsonl'}: dropped a torn last line"):
        assert read_log(run / "completions.jsonl")[-1]["step"] == 3
    assert train(run, "--steps", "4", "--resume") == 0
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [json.loads(ln)["step"] for ln in (run / "completions.jsonl").read_text().splitlines()][-1] == 4


def test_sirl_plot_reads_a_torn_log_and_names_a_corrupt_one(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward_mean": -')
    with pytest.warns(UserWarning, match="torn last line"):
        assert plot(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0}\n[1, 2]\n')
    assert main(["plot", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}, line 2: expected a JSON object, got list" in error_line(capsys)


# ---- output directories ------------------------------------------------------------------------------------------

def test_a_fresh_run_refuses_another_runs_files_and_overwrite_moves_them_aside(run, capsys, tmp_path):
    only_logs = tmp_path / "logs-only"
    only_logs.mkdir()
    shutil.copy(run / "metrics.jsonl", only_logs)
    shutil.copy(run / "config.json", only_logs)
    before = (only_logs / "metrics.jsonl").read_text()
    assert train(only_logs, "--steps", "1") == 2
    line = error_line(capsys)
    assert f"{only_logs} already holds a run (config.json, metrics.jsonl): pass --resume" in line
    assert (only_logs / "metrics.jsonl").read_text() == before
    assert train(only_logs, "--steps", "1", "--overwrite") == 0
    aside = [p for p in only_logs.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == before
    assert steps(only_logs) == [1]
    assert train(run, "--steps", "1", "--overwrite", "--resume") == 2
    assert "give one of them" in error_line(capsys)


def test_an_unusable_output_directory_is_one_line_naming_it(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert train(blocker / "run", "--steps", "1") == 2
    assert f"cannot write into the output directory {blocker / 'run'}" in error_line(capsys)


def test_a_full_disk_at_a_checkpoint_names_it_and_keeps_the_previous_one(run, capsys, monkeypatch):
    real = checkpoint._torch_save

    def full_disk(obj, path):
        if "checkpoint-0000005" in str(path):
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoint, "_torch_save", full_disk)
    assert train(run, "--steps", "5", "--resume") == 2
    line = error_line(capsys)
    assert f"cannot write the checkpoint {run / 'checkpoint-0000005'}: No space left on device" in line
    assert not (run / "checkpoint-0000005.tmp").exists()
    assert checkpoint.manifest_problem(run / "checkpoint-0000004") is None
    monkeypatch.undo()
    assert train(run, "--steps", "5", "--resume") == 0  # room again: the run goes on from checkpoint 4
    assert steps(run) == [1, 2, 3, 4, 5]


def test_a_really_full_disk(three_steps, tmp_path, capsys):
    """The same on a 4 MiB tmpfs filled up after checkpoint 3: torch.save's own error becomes one line."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = mount / "run"
        shutil.copytree(three_steps, out, ignore=shutil.ignore_patterns("checkpoint-000000[12]", "eval"))
        stat = os.statvfs(mount)
        (mount / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 64 * 1024))
        assert train(out, "--steps", "4", "--resume") == 2
        line = error_line(capsys)
        assert str(out) in line and "No space left on device" in line, line
        assert checkpoint.manifest_problem(out / "checkpoint-0000003") is None
        assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---- checkpoints ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated optim.pt", "empty rng file", "garbage state.json", "no manifest"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(damage, run, capsys):
    latest = run / "checkpoint-0000003"
    if damage == "truncated optim.pt":
        data = (latest / "optim.pt").read_bytes()
        (latest / "optim.pt").write_bytes(data[: len(data) // 2])
    elif damage == "empty rng file":
        (latest / "rng_rank0.json").write_text("")
    elif damage == "garbage state.json":
        (latest / "state.json").write_text("{{{")
    else:
        (latest / "manifest.json").unlink()
    assert train(run, "--steps", "3", "--resume") == 0
    err = capsys.readouterr().err
    assert f"warning: --resume skips a damaged checkpoint: {latest}" in err, err
    assert steps(run) == [1, 2, 3]  # step 3 ran again from checkpoint 2
    assert checkpoint.manifest_problem(latest) is None  # and was written again, whole


@pytest.mark.parametrize("field, value, problem", [
    ("step", -5, "step -5 is not the checkpoint's step 3"),
    ("step", 3.0, "step 3.0 is not the checkpoint's step 3"),
    ("position", -7, "data position -7 is impossible after 3 steps"),
    ("seed", 99, "data seed 99 is not the run's seed 0"),
    ("selection", [1], "selection must be an object"),
])
def test_a_tampered_state_json_with_a_matching_manifest_is_refused(field, value, problem, run, capsys, no_model):
    for ckpt in checkpoint.checkpoint_dirs(run):
        state = json.loads((ckpt / "state.json").read_text())
        if field in ("position", "seed"):
            state["data"][field] = value
        else:
            state[field] = value
        (ckpt / "state.json").write_text(json.dumps(state))
        write_manifest(ckpt, {"step": checkpoint.checkpoint_step(ckpt), "ranks": 1})
    assert train(run, "--steps", "4", "--resume") == 2
    line = error_line(capsys)
    assert "no intact checkpoint" in line and f"{run / 'checkpoint-0000003' / 'state.json'}: {problem}" in line, line


def test_a_checkpoint_past_the_configured_steps_is_refused(run, capsys, no_model):
    assert train(run, "--steps", "2", "--resume") == 2
    assert "checkpoint-0000003 is at step 3, past steps=2 (raise --steps to continue the run)" in error_line(capsys)
    assert steps(run) == [1, 2, 3]


def test_resume_without_any_checkpoint_says_how_to_start_again(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert train(out, "--steps", "2", "--resume") == 2
    assert f"no checkpoint in {out} (start it again with --overwrite)" in error_line(capsys)


def test_a_checkpoint_of_another_model_is_not_loaded(run, capsys):
    assert train(run, "--steps", "4", "--resume", "lora_r=8") == 2
    assert "--resume cannot change lora_r: 4 -> 8" in error_line(capsys)
