import pytest

pytest.importorskip("yaml", reason="pyyaml is not installed")

from sirl.config import SIRLConfig, load_config  # noqa: E402


def test_defaults_follow_the_paper():
    cfg = SIRLConfig()
    assert (cfg.group_size, cfg.clip_eps_low, cfg.clip_eps_high, cfg.kl_beta, cfg.lr, cfg.temperature) == (
        4, 0.2, 0.2, 0.001, 1e-6, 1.0)
    assert cfg.reward_aggregation == "mean" and cfg.loss_aggregation == "token-mean"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\ngroup_size: 8\nmodel: foo\n")
    cfg = load_config(path, overrides=["group_size=6", "kl_estimator=k2", "reward_last_k=16", "lr=3e-4"])
    assert cfg.group_size == 6 and cfg.kl_estimator == "k2" and cfg.reward_last_k == 16
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert load_config(path).lr == 1e-5  # YAML's "1e-5" string coerced to float
    assert cfg.model == "foo"


def test_presets_load():
    demo = load_config(preset="cpu-demo", overrides=["steps=3"])
    assert demo.group_size == 4 and demo.lora and demo.model == "smollm2-135m-instruct" and demo.steps == 3
    assert load_config(preset="tiny").model == "tiny-random-llama"


@pytest.mark.parametrize("bad", [["nope=1"], ["truncation=drop"], ["group_size=1"], ["lossless"]])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        load_config(overrides=bad)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="cpu-demo"):
        load_config(preset="nope")
