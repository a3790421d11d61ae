"""Honest resume: the saved config is compared with the new one before any model loads; only a short list of
keys may change, anything else is refused (listing the keys) unless --allow-config-change, which logs the changes
and applies them (the optimizer's lr included). config.json always holds the settings the run goes on with."""

import json

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")

from sirl.cli import main  # noqa: E402
from sirl.config import (  # noqa: E402
    MAY_CHANGE_ON_RESUME, ConfigError, SIRLConfig, check_resume_changes, config_changes,
)

BASE = ["--preset", "tiny", "max_new_tokens=4", "progress=false", "log_completions_every=0", "lr_schedule=constant",
        "lr=1e-3", "save_every=2"]


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_changes_and_the_allowed_list():
    saved = SIRLConfig().to_dict()
    del saved["eval_every"]  # written by an older version: a missing key counts as its default
    new = SIRLConfig(steps=200, lr=5e-6, group_size=8)
    assert config_changes(saved, new) == {"group_size": (4, 8), "lr": (1e-6, 5e-6), "steps": (100, 200)}
    with pytest.raises(ConfigError, match=r"group_size: 4 -> 8; lr: 1e-06 -> 5e-06; only steps, save_every"):
        check_resume_changes(saved, new, allow=False)
    assert set(check_resume_changes(saved, new, allow=True)) == {"group_size", "lr", "steps"}
    free = SIRLConfig(**{"steps": 7, "save_every": 3, "keep_checkpoints": 5, "eval_every": 0, "progress": False,
                         "output_dir": "elsewhere", "log_completions_every": 0, "tensorboard": True,
                         "early_stop_patience": 0, "extra": {"note": "x"}})
    assert set(check_resume_changes(saved, free, allow=False)) <= set(MAY_CHANGE_ON_RESUME)
    with pytest.raises(ConfigError, match="cannot change lora_r: 16 -> 8"):
        check_resume_changes(saved, SIRLConfig(lora_r=8), allow=True)


def test_resume_refuses_changed_settings_before_loading_and_keeps_config_json(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--steps", "2", "--output-dir", str(out)]) == 0
    saved = (out / "config.json").read_text()

    import sirl.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the resume check")

    monkeypatch.setattr(sirl.models, "load_model_and_tokenizer", no_model)
    capsys.readouterr()
    assert main(["train", *BASE, "--steps", "4", "--output-dir", str(out), "--resume", "lr=0.5",
                 "group_size=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group_size: 4 -> 8" in err and "lr: 0.001 -> 0.5" in err, err
    assert "--allow-config-change" in err and "steps" not in err.split("only")[0]  # steps may change
    assert (out / "config.json").read_text() == saved  # never rewritten to settings the run did not use
    assert [r["step"] for r in rows(out)] == [1, 2]
    assert main(["train", *BASE, "--steps", "4", "--output-dir", str(out), "--allow-config-change",
                 "lr=0.5"]) == 2
    assert "only applies with --resume" in capsys.readouterr().err


def test_resume_may_change_the_listed_keys(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--steps", "2", "--output-dir", str(out)]) == 0
    assert main(["train", *BASE, "--steps", "3", "--output-dir", str(out), "--resume", "save_every=1",
                 "keep_checkpoints=3", "progress=true"]) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["steps"], cfg["save_every"], cfg["keep_checkpoints"]) == (3, 1, 3)
    changes = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 2, "changes": {"steps": [2, 3], "save_every": [2, 1], "keep_checkpoints": [2, 3],
                                               "progress": [False, True]}}]


def test_allow_config_change_logs_and_applies_the_new_lr(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--steps", "2", "--output-dir", str(out)]) == 0
    assert [r["lr"] for r in rows(out)] == [1e-3, 1e-3]
    capsys.readouterr()
    assert main(["train", *BASE, "--steps", "4", "--output-dir", str(out), "--resume", "--allow-config-change",
                 "lr=0.5", "weight_decay=0.1"]) == 0
    assert "applies config changes" in capsys.readouterr().out
    assert [r["lr"] for r in rows(out)] == [1e-3, 1e-3, 0.5, 0.5]  # the optimizer follows the new lr at once
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 0.5 and cfg["weight_decay"] == 0.1 and cfg["steps"] == 4
    logged = json.loads((out / "config_changes.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 2 and logged["changes"]["lr"] == [1e-3, 0.5]
    assert logged["changes"]["weight_decay"] == [0.0, 0.1]
    import torch

    optim = torch.load(out / "checkpoint-0000004" / "optim.pt", weights_only=True)["optimizer"]
    assert optim["param_groups"][0]["weight_decay"] == 0.1 and optim["param_groups"][0]["initial_lr"] == 0.5
