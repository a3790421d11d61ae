"""The config is checked key by key, and between keys, before any model loads; errors are one line."""

import dataclasses

import pytest

pytest.importorskip("yaml", reason="pyyaml is not installed")

import sirl.config as config_mod  # noqa: E402
from sirl.cli import main  # noqa: E402
from sirl.config import FIELDS, HINTS, ConfigError, SIRLConfig, load_config  # noqa: E402


def test_defaults_follow_the_paper():
    cfg = SIRLConfig()
    assert (cfg.group_size, cfg.clip_eps_low, cfg.clip_eps_high, cfg.kl_beta, cfg.lr, cfg.temperature) == (
        4, 0.2, 0.2, 0.001, 1e-6, 1.0)
    assert cfg.reward_aggregation == "mean" and cfg.loss_aggregation == "token-mean"
    assert cfg.validate() is cfg


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\ngroup_size: 8\nmodel: foo\n")
    cfg = load_config(path, overrides=["group_size=6", "kl_estimator=k2", "reward_last_k=16", "lr=3e-4"])
    assert cfg.group_size == 6 and cfg.kl_estimator == "k2" and cfg.reward_last_k == 16
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert load_config(path).lr == 1e-5  # YAML's "1e-5" string coerced to float
    assert cfg.model == "foo"
    cfg = load_config(overrides=["reward_last_k=null", "system_prompt=Be brief.", "lora_target_modules=q_proj,v_proj",
                                 "eval_attacks=[direct, base64]", "steps=1e3"])
    assert cfg.reward_last_k is None and cfg.system_prompt == "Be brief." and cfg.steps == 1000
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.eval_attacks == ["direct", "base64"]


def test_presets_load():
    demo = load_config(preset="cpu-demo", overrides=["steps=3"])
    assert demo.group_size == 4 and demo.lora and demo.model == "smollm2-135m-instruct" and demo.steps == 3
    assert demo.eval_every and demo.eval_harmful and demo.eval_overrefusal and demo.keep_best == "eval/safety"
    assert load_config(preset="tiny").model == "tiny-random-llama"


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="cpu-demo"):
        load_config(preset="nope")


@pytest.mark.parametrize("bad, message", [
    (["nope=1"], "unknown config key 'nope'"),
    (["lr_ratio=1"], "did you mean min_lr_ratio"),
    (["lossless"], "not of the form key=value"),
])
def test_unknown_keys_and_malformed_overrides(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=bad)


# ---- every rule of every key, generated from the dataclass so a new key cannot be left unchecked -------------


def _range_violations():
    """(key, bad value) for every bound and every set of choices a key declares."""
    cases = []
    for name, f in FIELDS.items():
        meta = f.metadata
        if meta["choices"]:
            cases.append((name, "not-a-choice"))
        if meta["gt"] is not None:
            cases.append((name, meta["gt"]))
        if meta["ge"] is not None:
            cases.append((name, meta["ge"] - 1))
        if meta["lt"] is not None:
            cases.append((name, meta["lt"]))
        if meta["le"] is not None:
            cases.append((name, meta["le"] + 1))
        if meta["nonempty"]:
            cases.append((name, ""))
    return cases


def _type_violations():
    """(key, bad value) for every key's type: a non-boolean word, a fraction for an integer, text for a number,
    a number for a string, a string for a mapping."""
    cases = []
    for name in FIELDS:
        hint = str(HINTS[name])
        if HINTS[name] is bool:
            cases += [(name, "maybe"), (name, 2), (name, "on")]
        elif "int" in hint:
            cases += [(name, 1.5), (name, "1.5"), (name, "many"), (name, True)]
        elif "float" in hint:
            cases += [(name, "abc"), (name, float("nan")), (name, float("inf")), (name, True)]
        elif HINTS[name] is dict:
            cases.append((name, "- a\n- b"))
        elif "list" in hint:
            cases.append((name, [1, 2]))
        else:
            cases.append((name, 12))
    return cases


@pytest.mark.parametrize("key, value", _range_violations() + _type_violations(),
                         ids=lambda v: str(v)[:20])
def test_every_rule_of_every_key_rejects_with_a_one_line_error(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(overrides={key: value})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key}=") and "must" in message, message


# Keys whose type is their whole rule (any finite penalty, any system prompt, any mapping of notes; the device
# has its own existence check). Every other key that is not a boolean must declare a range, choices or nonempty.
UNCONSTRAINED = {"device", "system_prompt", "truncation_penalty", "extra"}


def _declares_allowed_values(name: str) -> bool:
    meta = FIELDS[name].metadata
    return bool(meta["choices"] or meta["nonempty"] or any(meta[k] is not None for k in ("gt", "ge", "lt", "le")))


def test_every_key_has_a_doc_and_declares_what_it_allows():
    for name, f in FIELDS.items():
        assert f.metadata["doc"] and "\n" not in f.metadata["doc"], name
        assert _declares_allowed_values(name) or HINTS[name] is bool or name in UNCONSTRAINED, (
            f"{name} declares no range, choices or nonempty (or add it to UNCONSTRAINED, saying why)")
    stale = sorted(n for n in UNCONSTRAINED if n not in FIELDS or _declares_allowed_values(n))
    assert not stale, f"UNCONSTRAINED lists keys that are gone or now constrained: {stale}"


@pytest.mark.parametrize("override, message", [
    # the settings the issue found silently accepted or failing late
    ("kl_beta=-1", "kl_beta=-1: must be a number >= 0"),
    ("top_p=2", r"top_p=2: must be a number in \(0, 1\]"),
    ("top_p=0", r"top_p=0: must be a number in \(0, 1\]"),
    ("clip_eps_low=-0.5", r"clip_eps_low=-0.5: must be a number in \[0, 1\)"),
    ("clip_eps_high=-0.1", "clip_eps_high=-0.1: must be a number >= 0"),
    ("lora=maybe", "lora=maybe: must be a boolean: true/false, 1/0 or yes/no"),
    ("lr=-1", "lr=-1: must be a number > 0"),
    ("lr=0", "lr=0: must be a number > 0"),
    ("steps=1.5", "steps=1.5: must be an integer >= 1"),
    ("steps=0", "steps=0: must be an integer >= 1"),
    ("temperature=0", "temperature=0: must be a number > 0"),
    ("group_size=1", "group_size=1: must be an integer >= 2"),
    ("truncation=drop", "truncation=drop: must be one of keep, mask, penalize"),
    ("device=tpu", "device=tpu: must be auto, cpu, cuda or cuda:N"),
])
def test_the_issues_examples(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_device_must_exist(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda: no CUDA device on this machine"):
        load_config(overrides=["device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(overrides=["device=cuda:1"]).device == "cuda:1"
    with pytest.raises(ConfigError, match=r"device=cuda:2: this machine has 2 CUDA device\(s\)"):
        load_config(overrides=["device=cuda:2"])
    assert load_config(overrides=["device=cpu"]).device == "cpu"


@pytest.mark.parametrize("word, value", [("true", True), ("True", True), ("1", True), ("yes", True), ("YES", True),
                                         ("false", False), ("0", False), ("no", False), ("No", False)])
def test_strict_booleans(word, value):
    assert load_config(overrides=[f"lora={word}"]).lora is value


def test_boundaries_that_are_allowed():
    cfg = load_config(overrides=["kl_beta=0", "top_p=1", "clip_eps_low=0", "clip_eps_high=0", "top_k=0",
                                 "warmup_steps=0", "min_lr_ratio=1", "lora_dropout=0", "eval_every=0"])
    assert (cfg.kl_beta, cfg.top_p, cfg.clip_eps_low, cfg.clip_eps_high) == (0.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("overrides, message", [
    (["eval_every=5"], "eval_every=5: name at least one evaluation set"),
    (["eval_score_fn=mod:fn"], "eval_score_fn=mod:fn: needs eval_capability"),
    (["eval_judge=gpt4"], "eval_judge=gpt4: must be keyword"),
    (["eval_judge=llm:"], "eval_judge=llm:: must be keyword"),
    (["keep_best=eval/dsr"], "keep_best=eval/dsr: needs eval_every > 0"),
    (["early_stop_patience=2"], "early_stop_patience=2: needs keep_best"),
    (["prompts=no-such-file.jsonl"], "prompts=no-such-file.jsonl: no such file"),
    (["eval_every=5", "eval_harmful=no-such.csv?label=x"], r"eval_harmful=no-such.csv\?label=x: no such file"),
    (["eval_every=5", "eval_overrefusal=no-such.csv"], "eval_overrefusal=no-such.csv: no such file"),
    (["eval_every=5", "eval_capability=no-such.csv"], "eval_capability=no-such.csv: no such file"),
])
def test_rules_between_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_keep_best_metric_is_checked_with_the_eval_sets_not_by_the_config():
    """Which eval/* metrics an evaluation writes depends on the sets as loaded (their attack columns), so train()
    checks keep_best against the loaded suite (tests/sirl/test_train_eval.py); the config accepts any name."""
    cfg = load_config(overrides=["eval_every=5", "eval_harmful=prompts_cpu_demo.jsonl?label=harmful",
                                 "eval_attacks=direct,base64", "eval_overrefusal=overrefusal_cpu_demo.jsonl",
                                 "keep_best=eval/dsr/base64", "keep_best_mode=min", "early_stop_patience=3"])
    assert cfg.keep_best == "eval/dsr/base64" and cfg.early_stop_patience == 3
    assert load_config(overrides=["eval_every=5", "eval_harmful=prompts_cpu_demo.jsonl",
                                  "eval_overrefusal=overrefusal_cpu_demo.jsonl", "keep_best=eval/safety"])
    assert load_config(overrides=["eval_every=5", "eval_overrefusal=overrefusal_cpu_demo.jsonl",
                                  "keep_best=eval/dsr"]).keep_best == "eval/dsr"  # train() refuses it


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli_error_is_one_line_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import sirl.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(sirl.models, "load_model_and_tokenizer", no_model)
    for bad in (["kl_beta=-1"], ["steps=1.5"], ["lora=maybe"], ["device=cuda:7"], ["lr=-0.1"],
                ["eval_every=1", "eval_harmful=prompts_cpu_demo.jsonl", "eval_attacks=rot14"],
                ["eval_every=1", "eval_harmful=prompts_cpu_demo.jsonl?colour=red"],
                ["eval_every=1", "eval_overrefusal=overrefusal_cpu_demo.jsonl", "keep_best=eval/dsr"]):
        assert main(["train", "--preset", "tiny", "--output-dir", str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err
        key = bad[-1].split("=")[0]
        assert err.count("\n") == 1 and err.startswith(f"sirl train: error: {key}=") and "--debug" in err, err
    assert not (tmp_path / "x").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="top_p=2"):
        main(["train", "--preset", "tiny", "--output-dir", str(tmp_path), "top_p=2", "--debug"])
    with pytest.raises(ConfigError, match="top_p=2"):
        main(["--debug", "train", "--preset", "tiny", "--output-dir", str(tmp_path), "top_p=2"])


def test_train_help_lists_presets_and_every_key_with_default_and_doc(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "cpu-demo:" in text and "tiny:" in text
    flat = " ".join(text.split())
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert f"{name}={config_mod.json.dumps(default)}" in flat, name
        assert " ".join(f.metadata["doc"].split())[:40] in flat, name
    assert "[a number > 0]" in flat and "--allow-config-change" in flat  # the allowed range, in words
