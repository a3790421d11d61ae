"""The loop optimises what it claims to, on a tiny random Llama on CPU.

1. SIRL itself: 30 steps raise the mean reward (the policy's entropy falls).
2. A sign-sensitive check of the same loop: with the reward swapped for "fraction of completion tokens that are
   'yes'", that fraction must climb. (Entropy alone cannot show the sign is right: from a near-uniform start any
   sizeable update lowers entropy, whatever the advantages; a misaligned or sign-flipped advantage fails test 2.)
"""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

import sirl.rollout.hf as rollout_hf  # noqa: E402
import sirl.scoring as scoring_mod  # noqa: E402
import sirl.train as train_mod  # noqa: E402
from sirl.config import load_config  # noqa: E402
from sirl.models import tiny_tokenizer  # noqa: E402


def run(out, steps, lr):
    cfg = load_config(preset="tiny", overrides=dict(
        steps=steps, max_new_tokens=8, lr=lr, kl_beta=0.0, output_dir=str(out), progress=False, save_every=1000,
    ))
    return train_mod.train(cfg)


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
def test_thirty_steps_raise_the_sirl_reward(tmp_path):
    rows = run(tmp_path, 30, 1e-2)
    first, last = mean([r["reward_mean"] for r in rows[:5]]), mean([r["reward_mean"] for r in rows[-5:]])
    assert last > first + 0.5, (first, last)
    assert rows[-1]["entropy_mean"] < rows[0]["entropy_mean"] - 0.5
    for r in rows:  # the logged reward is minus the mean entropy
        assert r["reward_mean"] == pytest.approx(-r["entropy_mean"], abs=1e-5)


def test_the_loop_climbs_a_token_reward(tmp_path, monkeypatch):
    target = tiny_tokenizer().convert_tokens_to_ids("yes")
    freq, last = [], {}
    real_rollout = rollout_hf.generate_rollout

    def recording_rollout(*args, **kwargs):
        r = real_rollout(*args, **kwargs)
        m = r.completion_mask.bool()
        freq.append(((r.input_ids == target) & m).sum().item() / m.sum().item())
        last["batch"] = r
        return r

    def yes_reward(entropy, completion_mask, truncated, spec, keys=None):
        r = last["batch"]
        m = r.completion_mask.bool()
        return ((r.input_ids == target) & m).float().sum(-1) / m.sum(-1), torch.ones(len(r), dtype=torch.bool)

    monkeypatch.setattr(rollout_hf, "generate_rollout", recording_rollout)
    monkeypatch.setattr(scoring_mod, "sirl_rewards", yes_reward)
    run(tmp_path, 15, 1e-2)
    assert freq[0] < 0.1 and mean(freq[-3:]) > 0.3, freq
