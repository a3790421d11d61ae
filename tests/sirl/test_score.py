import math

import pytest
import torch

from sirl.score import reward_mask, sirl_rewards

ENT = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0, 5.0]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
TRUNC = torch.tensor([False, False, True])


def test_reward_mean_and_sum_hand_computed():
    r, valid = sirl_rewards(ENT, MASK, TRUNC)
    torch.testing.assert_close(r, torch.tensor([-2.0, -4.0, -2.0]))
    assert valid.all()
    r, _ = sirl_rewards(ENT, MASK, TRUNC, aggregation="sum")
    torch.testing.assert_close(r, torch.tensor([-6.0, -4.0, -8.0]))


def test_last_k_window():
    assert reward_mask(MASK, 2).long().tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    r, _ = sirl_rewards(ENT, MASK, TRUNC, last_k=2)
    torch.testing.assert_close(r, torch.tensor([-2.5, -4.0, -3.0]))


def test_truncation_policies():
    r, valid = sirl_rewards(ENT, MASK, TRUNC, truncation="mask")
    assert valid.tolist() == [True, True, False]
    r, valid = sirl_rewards(ENT, MASK, TRUNC, truncation="penalize", truncation_penalty=-7.0)
    torch.testing.assert_close(r, torch.tensor([-2.0, -4.0, -7.0]))
    assert valid.all()
    with pytest.raises(ValueError):
        sirl_rewards(ENT, MASK, TRUNC, truncation="drop")


def test_reward_on_a_toy_distribution():
    """A model whose head is zero predicts uniformly: every token's entropy is log V, the reward -log V.
    One peaked head row (a bias-like spike on one token) lowers the entropy by a hand-computable amount."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from sirl.models import tiny_random_llama, tiny_tokenizer
    from sirl.rollout import Rollout
    from sirl.score import token_logprobs_entropy

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


def test_reward_options_check_only_the_reward_keys(monkeypatch):
    """The integrations' reward options are checked (and converted) by their SIRLConfig keys' rules alone: no
    whole config is built and validated (its files, device and evaluation rules are no business of a reward)."""
    import sirl.config
    from sirl.config import ConfigError
    from sirl.score import reward_options

    monkeypatch.setattr(sirl.config.SIRLConfig, "validate", lambda self: pytest.fail("a whole config was validated"))
    assert reward_options() == dict(aggregation="mean", last_k=None, truncation="keep", truncation_penalty=-10.0)
    options = reward_options("sum", "4", "penalize", -3)
    assert options == dict(aggregation="sum", last_k=4, truncation="penalize", truncation_penalty=-3.0)
    assert isinstance(options["truncation_penalty"], float)
    for bad, message in [(dict(aggregation="max"), "reward_aggregation=max: must be one of mean, sum"),
                         (dict(last_k=0), "reward_last_k=0: must be an integer >= 1"),
                         (dict(truncation="drop"), "truncation=drop: must be one of keep, mask, penalize"),
                         (dict(truncation_penalty=float("nan")), "truncation_penalty=nan: must be a number")]:
        with pytest.raises(ConfigError, match=message):
            reward_options(**bad)
