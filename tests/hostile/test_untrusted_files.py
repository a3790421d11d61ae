"""Run directories are data: a pickle payload planted in any file a run reads back never runs, and the error
names the file.

The payload is what ``torch.save`` writes for an object whose ``__reduce__`` calls ``os.mkdir``: unpickled as an
object, it would create the marker directory. Each file of a checkpoint is replaced by it twice: with the
checkpoint's manifest left as it was (the sha256 check refuses the file) and with the manifest rewritten to match
(the file must then be refused by the data-only reader itself).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

from sirl.cli import main  # noqa: E402
from sirl.config import load_config  # noqa: E402
from sirl.files import MANIFEST, write_manifest  # noqa: E402
from sirl.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = "checkpoint-0000002"


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save(Payload(str(marker)), buffer)
    path.write_bytes(buffer.getvalue())


def overrides(out: Path, **extra) -> dict:
    return {**dict(steps=2, save_every=2, keep_checkpoints=1, lora=True, lora_r=4, max_new_tokens=4, eval_every=2,
                   eval_overrefusal="overrefusal_cpu_demo.jsonl", eval_limit=2, eval_max_new_tokens=3,
                   keep_best="eval/entropy", output_dir=str(out), progress=False), **extra}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    train(load_config(preset="tiny", overrides=overrides(out)))
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("sirl ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("rewrite_manifest", [False, True], ids=["stale-manifest", "matching-manifest"])
@pytest.mark.parametrize("name", ["trainable.safetensors", "optim.pt", "rng_rank0.json", "state.json", "config.json",
                                  MANIFEST])
def test_a_payload_in_any_checkpoint_file_never_runs_and_is_named(name, rewrite_manifest, finished_run, tmp_path,
                                                                   capsys):
    if name == MANIFEST and rewrite_manifest:
        pytest.skip("the manifest itself is the planted file")
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "payload-ran"
    plant(out / CHECKPOINT / name, marker)
    if rewrite_manifest:
        write_manifest(out / CHECKPOINT, {"step": 2, "ranks": 1})
    args = [f"{k}={v}" for k, v in overrides(out, steps=3).items()]
    assert main(["train", "--preset", "tiny", "--resume", *args]) == 2
    line = one_error_line(capsys)
    assert not marker.exists(), "the planted payload ran"
    assert str(out / CHECKPOINT / name) in line, line


@pytest.mark.parametrize("where", ["final", "best"])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
@pytest.mark.parametrize("rewrite_manifest", [False, True], ids=["stale-manifest", "matching-manifest"])
def test_a_payload_in_a_saved_adapter_never_runs_and_is_named(where, name, rewrite_manifest, finished_run, tmp_path,
                                                              capsys):
    adapter = tmp_path / where
    shutil.copytree(finished_run / where, adapter)
    marker = tmp_path / "payload-ran"
    plant(adapter / name, marker)
    if rewrite_manifest:
        write_manifest(adapter)
    code = main(["eval", "overrefusal", "--model", "tiny-random-llama", "--adapter", str(adapter), "--limit", "1",
                 "--max-new-tokens", "2", "--data", "overrefusal_cpu_demo.jsonl", "--no-progress", "--output-dir",
                 str(tmp_path / "eval")])
    assert code == 2
    line = one_error_line(capsys)
    assert not marker.exists(), "the planted payload ran"
    assert str(adapter) in line, line


def test_a_pickled_bin_adapter_from_elsewhere_is_read_weights_only(finished_run, tmp_path, capsys):
    """An adapter without manifest or safetensors (not written by sirl): peft reads its .bin with
    weights_only=True, which refuses the payload's os.mkdir."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(finished_run / "final" / "adapter_config.json", adapter)
    marker = tmp_path / "payload-ran"
    plant(adapter / "adapter_model.bin", marker)
    code = main(["eval", "overrefusal", "--model", "tiny-random-llama", "--adapter", str(adapter), "--limit", "1",
                 "--max-new-tokens", "2", "--data", "overrefusal_cpu_demo.jsonl", "--no-progress", "--output-dir",
                 str(tmp_path / "eval")])
    assert code == 2 and not marker.exists()
    assert str(adapter) in one_error_line(capsys)


def test_a_payload_in_a_saved_full_model_never_runs_and_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(preset="tiny", overrides=dict(steps=1, save_every=1, max_new_tokens=3, output_dir=str(out),
                                                    progress=False)))
    marker = tmp_path / "payload-ran"
    plant(out / "final" / "model.safetensors", marker)
    write_manifest(out / "final")
    code = main(["eval", "overrefusal", "--model", str(out / "final"), "--limit", "1", "--max-new-tokens", "2",
                 "--data", "overrefusal_cpu_demo.jsonl", "--no-progress", "--output-dir", str(tmp_path / "eval")])
    assert code == 2 and not marker.exists()
    assert str(out / "final") in one_error_line(capsys)


def test_no_file_is_read_as_pickled_objects_anywhere():
    """Grep-level: nothing in the repository's Python unpickles objects from disk."""
    risky = re.compile("weights_only" + r"\s*=\s*False|pickle\.loads?\(|yaml\.load\((?!.*Loader=_yaml_loader)")
    found = []
    for path in REPO.rglob("*.py"):
        if any(part in (".venv", "build", "dist", "runs") for part in path.relative_to(REPO).parts):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if risky.search(line):
                found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert found == []
