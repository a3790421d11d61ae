import dataclasses
import math

import pytest
import torch

from sirl.knobs import ConfigError
from sirl.reward import RewardSpec
from sirl.scoring import Scoring, reward_mask, sirl_rewards, uniform_from_keys

ENT = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0, 5.0]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
TRUNC = torch.tensor([False, False, True])


def test_reward_mean_and_sum_hand_computed():
    r, valid = sirl_rewards(ENT, MASK, TRUNC)
    torch.testing.assert_close(r, torch.tensor([-2.0, -4.0, -2.0]))
    assert valid.all()
    r, _ = sirl_rewards(ENT, MASK, TRUNC, RewardSpec(reward_aggregation="sum"))
    torch.testing.assert_close(r, torch.tensor([-6.0, -4.0, -8.0]))


def test_last_k_window():
    assert reward_mask(MASK, 2).long().tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    r, _ = sirl_rewards(ENT, MASK, TRUNC, RewardSpec(reward_last_k=2))
    torch.testing.assert_close(r, torch.tensor([-2.5, -4.0, -3.0]))


def test_truncation_policies():
    r, valid = sirl_rewards(ENT, MASK, TRUNC, RewardSpec(truncation="mask"))
    assert valid.tolist() == [True, True, False]
    r, valid = sirl_rewards(ENT, MASK, TRUNC, RewardSpec(truncation="penalize", truncation_penalty=-7.0))
    torch.testing.assert_close(r, torch.tensor([-2.0, -4.0, -7.0]))
    assert valid.all()
    with pytest.raises(ConfigError, match="truncation=drop: must be one of keep, mask, penalize"):
        RewardSpec(truncation="drop")


def test_the_ablation_rewards():
    """reward=entropy is minus SIRL's reward; reward=random depends on the row keys only, never on the answer."""
    sirl, _ = sirl_rewards(ENT, MASK, TRUNC)
    reversed_, _ = sirl_rewards(ENT, MASK, TRUNC, RewardSpec(reward="entropy"))
    torch.testing.assert_close(reversed_, -sirl)
    keys = [(0, 1, i) for i in range(3)]
    noise, _ = sirl_rewards(ENT, MASK, TRUNC, RewardSpec(reward="random"), keys)
    again, _ = sirl_rewards(ENT * 7 + 1, MASK, TRUNC, RewardSpec(reward="random"), keys)
    assert torch.equal(noise, again) and ((noise >= 0) & (noise < 1)).all() and noise.unique().numel() == 3
    other, _ = sirl_rewards(ENT, MASK, TRUNC, RewardSpec(reward="random"), [(0, 2, i) for i in range(3)])
    assert not torch.equal(noise, other)
    with pytest.raises(ValueError, match="reward=random needs one key per row"):
        sirl_rewards(ENT, MASK, TRUNC, RewardSpec(reward="random"))
    u = uniform_from_keys([(s, 1, i) for s in range(50) for i in range(40)])  # 2000 draws: U[0, 1)
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12 / 2000) ** 0.5  # 4 standard errors


def test_scoring_forms_group_advantages_from_the_spec():
    batch = type("B", (), {"completion_mask": MASK[[0, 1, 2, 0]], "truncated": torch.zeros(4, dtype=torch.bool)})
    ent = torch.cat([ENT, ENT[:1] * 3])  # rewards -2, -4 | -2, -6: two groups with different spreads
    scores = Scoring(RewardSpec(), group_size=2)(batch, ent)
    r = -(ent * batch.completion_mask).sum(-1) / batch.completion_mask.sum(-1)
    torch.testing.assert_close(scores.rewards, r)
    std = torch.stack([r[:2].std(), r[2:].std()])
    torch.testing.assert_close(scores.advantages, (r - r.view(2, 2).mean(-1).repeat_interleave(2))
                               / std.repeat_interleave(2))


def test_reward_on_a_toy_distribution():
    """A model whose head is zero predicts uniformly: every token's entropy is log V, the reward -log V.
    One peaked head row (a bias-like spike on one token) lowers the entropy by a hand-computable amount."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from sirl.models import tiny_random_llama, tiny_tokenizer
    from sirl.passes import token_logprobs_entropy
    from sirl.rollout import Rollout

    tok = tiny_tokenizer()
    model = tiny_random_llama(tok)
    V = model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    comp = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    r = Rollout(ids, torch.ones_like(ids), comp, torch.tensor([False, False]), torch.tensor([0, 0]), 3)
    lp, ent = token_logprobs_entropy(model, r, temperature=1.0, token_budget=7)
    torch.testing.assert_close(ent[comp.bool()], torch.full((6,), math.log(V)))
    torch.testing.assert_close(lp[comp.bool()], torch.full((6,), -math.log(V)))
    rewards, _ = sirl_rewards(ent, comp, r.truncated)
    torch.testing.assert_close(rewards, torch.full((2,), -math.log(V)))
    assert ent[~comp.bool()].eq(0).all()
    # micro-batching (one row per pass) changes nothing
    lp1, ent1 = token_logprobs_entropy(model, r, temperature=1.0, token_budget=1)
    assert torch.equal(ent1, ent) and torch.equal(lp1, lp)


def test_the_reward_spec_checks_only_its_own_options_and_names_them_as_the_caller_spells_them(monkeypatch):
    """The integrations build a RewardSpec from their own configs: only the reward's options are checked (no
    whole SIRLConfig is built), converted from text, and a bad one is named with the caller's prefix."""
    import sirl.config

    monkeypatch.setattr(sirl.config.SIRLConfig, "validate", lambda self: pytest.fail("a whole config was validated"))
    assert RewardSpec.from_options({}) == RewardSpec()
    spec = RewardSpec.from_options({"sirl_reward_aggregation": "sum", "sirl_reward_last_k": "4",
                                    "sirl_truncation": "penalize", "sirl_truncation_penalty": -3, "other": 1},
                                   prefix="sirl_")
    assert spec == RewardSpec(reward_aggregation="sum", reward_last_k=4, truncation="penalize", truncation_penalty=-3.0)
    assert isinstance(spec.truncation_penalty, float)
    for bad, message in [({"reward_aggregation": "max"}, "sirl_reward_aggregation=max: must be one of mean, sum"),
                         ({"reward_last_k": 0}, "sirl_reward_last_k=0: must be an integer >= 1"),
                         ({"truncation": "drop"}, "sirl_truncation=drop: must be one of keep, mask, penalize"),
                         ({"truncation_penalty": float("nan")}, "sirl_truncation_penalty=nan: must be a number"),
                         ({"reward": "max_entropy"}, "sirl_reward=max_entropy: must be one of neg_entropy")]:
        with pytest.raises(ConfigError, match=message):
            RewardSpec.from_options({f"sirl_{k}": v for k, v in bad.items()}, prefix="sirl_")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.reward = "entropy"


def test_every_reward_option_is_a_config_key_and_a_trl_field():
    """One definition: the config and TRL's config expose exactly the spec's options, with its defaults."""
    from sirl.config import FIELDS
    from sirl.reward import FIELDS as SPEC

    for name, f in SPEC.items():
        assert name in FIELDS and FIELDS[name].metadata == f.metadata and FIELDS[name].default == f.default
