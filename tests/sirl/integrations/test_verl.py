"""sirl.integrations.verl on real tensors, against verl's documented interfaces (and verl itself when installed).

verl 0.9.1 pins transformers<5.11, so it is usually absent here: the reward manager is then fed a stand-in with
the two things it uses of verl's ``DataProto`` (``.batch`` with ``keys()`` / ``[key]``, and row slicing), and the
fused forward is called the way verl's FSDP engine calls ``model(...)`` with ``use_fused_kernels`` on.
``scripts/setup.sh`` puts verl 0.9.1 and the import-time dependencies the venv lacks in ``.venv/verl-overlay``,
which this file (and nothing else) appends to ``sys.path``: the tests marked for verl then run against verl's real
modules, and skip, saying so, where that folder is absent.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# Appended, so that the venv's own packages win over anything in the overlay; before sirl.integrations.verl is
# imported, so that its import registers the reward manager with verl.
VERL_OVERLAY = Path(__file__).resolve().parents[3] / ".venv" / "verl-overlay"
if VERL_OVERLAY.is_dir() and str(VERL_OVERLAY) not in sys.path:
    sys.path.append(str(VERL_OVERLAY))

import sirl.integrations.verl as sirl_verl  # noqa: E402
from sirl.integrations.verl import SIRLRewardManager, forward_with_sirl_kernels, install_verl_backend  # noqa: E402
from sirl.reward import RewardSpec  # noqa: E402
from sirl.scoring import sirl_rewards  # noqa: E402

HAVE_VERL = importlib.util.find_spec("verl") is not None
NO_VERL = f"verl is not installed: scripts/setup.sh puts verl 0.9.1 in {VERL_OVERLAY}"
EOS, PAD = 7, 0


class StandInDataProto:
    """What the manager uses of ``verl.DataProto``: ``.batch`` (a TensorDict there) and ``data[i:j]``."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self):
        return next(iter(self.batch.values())).shape[0]

    def __getitem__(self, rows):
        return StandInDataProto({k: v[rows] for k, v in self.batch.items()})


@pytest.fixture(params=["stand-in", pytest.param("verl", marks=pytest.mark.skipif(not HAVE_VERL, reason=NO_VERL))])
def make_data(request):
    if request.param == "verl":
        from verl import DataProto

        return lambda tensors: DataProto.from_dict(tensors=tensors)
    return StandInDataProto


def rollout_batch(seed=0):
    """3 rows: prompts left-padded to 4, responses right-padded to 6; row 0 ends with eos at 3, row 1 at 6
    (the last slot), row 2 runs out of room (truncated)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, 50, (3, 4), generator=g)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    lengths = torch.tensor([3, 6, 6])
    responses = torch.randint(10, 50, (3, 6), generator=g)
    response_mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    responses[0, 2] = EOS
    responses[1, 5] = EOS
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, PAD))
    return {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        # verl leaves arbitrary values past the response: the manager must mask them out
        "entropys": torch.rand(3, 6, generator=g) * 3,
        "rollout_log_probs": -torch.rand(3, 6, generator=g) * 4,
    }, response_mask, lengths


def test_reward_is_minus_mean_entropy_at_last_response_token(make_data):
    tensors, mask, lengths = rollout_batch()
    manager = SIRLRewardManager(eos_token_ids=[EOS])
    scores = manager(make_data(tensors))
    expected = -(tensors["entropys"] * mask).sum(-1) / lengths
    ours, _ = sirl_rewards(tensors["entropys"], mask, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(expected, ours)
    assert scores.shape == (3, 6) and scores.dtype == torch.float32
    for i, n in enumerate(lengths.tolist()):
        assert scores[i, n - 1] == pytest.approx(float(expected[i]), abs=1e-6)
        assert scores[i].count_nonzero() == 1


def test_reward_source_is_an_explicit_option(make_data):
    """"entropy" (default) reads only entropies and raises without them, naming the key and the option;
    "surprisal_estimate" reads only log-probs, even where entropies are present too."""
    tensors, mask, lengths = rollout_batch()
    exact = SIRLRewardManager(eos_token_ids=[EOS])
    estimate = SIRLRewardManager(eos_token_ids=[EOS], reward_source="surprisal_estimate")
    assert exact.reward_source == "entropy" and estimate.reward_source == "surprisal_estimate"
    assert exact.scores(make_data(tensors))[2] == "entropys"
    rewards, _, key = estimate.scores(make_data(tensors))
    assert key == "rollout_log_probs"
    # -H estimated by the sampled tokens' log-probs: E_y[log p(y)] = -H(p)
    torch.testing.assert_close(rewards, (tensors["rollout_log_probs"] * mask).sum(-1) / lengths)
    tensors["old_log_probs"] = tensors["rollout_log_probs"] - 1.0
    assert estimate.scores(make_data(tensors))[2] == "old_log_probs"

    tensors["entropy"] = tensors.pop("entropys")
    assert exact.scores(make_data(tensors))[2] == "entropy"
    del tensors["entropy"]
    with pytest.raises(KeyError, match="'entropy' needs .*entropys.* reward_source='surprisal_estimate'") as info:
        exact.scores(make_data(tensors))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="reward_source must be one of entropy, surprisal_estimate, got 'auto'"):
        SIRLRewardManager(eos_token_ids=[EOS], reward_source="auto")


def test_surprisal_estimate_is_unbiased():
    """Over many sampled tokens the mean log-prob of the sample converges to minus the entropy."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 50, generator=g) * 2, -1)
    samples = torch.multinomial(probs, 20000, replacement=True, generator=g)
    estimate = probs.log().gather(1, samples).mean(-1)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(estimate, -entropy, atol=0.05, rtol=0)


def test_truncation_options(make_data):
    tensors, mask, lengths = rollout_batch()
    data = make_data(tensors)
    keep = SIRLRewardManager(eos_token_ids=[EOS]).scores(data)[0]
    rewards, valid, _ = SIRLRewardManager(eos_token_ids=[EOS], truncation="penalize",
                                          truncation_penalty=-3.0).scores(data)
    torch.testing.assert_close(rewards, torch.cat([keep[:2], torch.tensor([-3.0])]))
    rewards, valid, _ = SIRLRewardManager(eos_token_ids=[EOS], truncation="mask").scores(data)
    assert valid.tolist() == [True, True, False]
    assert SIRLRewardManager(eos_token_ids=[EOS], truncation="mask")(data)[2].eq(0).all()
    with pytest.raises(ValueError, match="truncation"):
        SIRLRewardManager(eos_token_ids=[EOS], truncation="drop")


def test_options_from_verl_config_and_tokenizer():
    config = {"reward": {"reward_kwargs": {"truncation": "penalize", "truncation_penalty": -2, "reward_last_k": 2,
                                           "reward_source": "surprisal_estimate"}}}
    manager = SIRLRewardManager(config=config, tokenizer=types.SimpleNamespace(eos_token_id=EOS), compute_score=None)
    assert manager.spec == RewardSpec(reward_last_k=2, truncation="penalize", truncation_penalty=-2.0)
    assert manager.eos_token_ids == [EOS] and manager.reward_source == "surprisal_estimate"
    old_spelling = {"reward": {"reward_kwargs": {"last_k": 2}}}  # never silently ignored
    with pytest.raises(ValueError, match="unknown option.*last_k; SIRLRewardManager takes reward_source and reward"):
        SIRLRewardManager(config=old_spelling, tokenizer=types.SimpleNamespace(eos_token_id=EOS))


@pytest.mark.parametrize("source, key", [("entropy", "entropys"), ("surprisal_estimate", "rollout_log_probs")])
def test_reward_loop_contract(make_data, source, key):
    """run_single per trajectory + assemble_rm_scores == the batch call (verl's RewardLoopManager path); both
    contracts say in reward_extra_info which source and which batch key the reward came from."""
    tensors, _, _ = rollout_batch()
    data = make_data(tensors)
    manager = SIRLRewardManager(eos_token_ids=[EOS], reward_source=source)
    outs = [asyncio.run(manager.run_single(data[i:i + 1])) for i in range(len(data))]
    assert all(set(o) == {"reward_score", "reward_extra_info"} for o in outs)
    assert all(o["reward_extra_info"]["sirl_reward_source"] == source for o in outs)
    assert all(o["reward_extra_info"]["sirl_reward_key"] == key for o in outs)
    assembled = SIRLRewardManager.assemble_rm_scores(data, [o["reward_score"] for o in outs])
    torch.testing.assert_close(assembled, manager(data))
    full = manager(data, return_dict=True)
    torch.testing.assert_close(full["reward_tensor"], assembled)
    info = full["reward_extra_info"]
    assert len(info["sirl_reward"]) == 3
    assert info["sirl_reward_source"] == [source] * 3 and info["sirl_reward_key"] == [key] * 3


def test_missing_values_raise_with_the_config_hint(make_data):
    tensors, _, _ = rollout_batch()
    del tensors["entropys"], tensors["rollout_log_probs"]
    with pytest.raises(KeyError, match="reward_source=surprisal_estimate"):
        SIRLRewardManager(eos_token_ids=[EOS])(make_data(tensors))
    with pytest.raises(KeyError, match="'surprisal_estimate' needs .*rollout_log_probs.*calculate_log_probs"):
        SIRLRewardManager(eos_token_ids=[EOS], reward_source="surprisal_estimate")(make_data(tensors))


# ---------------------------------------------------------------------------------------------------------------
# fused forward for verl's actor

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


class TinyLlama(transformers.LlamaForCausalLM):
    """A subclass, so that patching "the model's class" in a test leaves LlamaForCausalLM alone."""


def tiny(tie=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    return TinyLlama(config)


def verl_eager_reference(model, temperature, **inputs):
    """verl's non-fused path: full logits / T, log_softmax, labels = input_ids rolled by -1 (float64)."""
    logits = model(**inputs).logits.double() / temperature
    logp = torch.log_softmax(logits, -1)
    rolled = torch.roll(inputs["input_ids"], shifts=-1, dims=-1)
    return logp.gather(-1, rolled[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_eager_padded_and_packed(tie):
    model = tiny(tie)
    temperature = 0.8
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    cases = {  # padded batch, and verl's remove-padding layout: one packed row [1, nnz] with shift_labels
        "padded": dict(input_ids=ids, attention_mask=attn, position_ids=pos),
        "packed": dict(input_ids=ids[0:1], attention_mask=None, position_ids=pos[0:1]),
    }
    for name, inputs in cases.items():
        out = forward_with_sirl_kernels(model, **inputs, temperature=temperature, return_dict=True,
                                        shift_labels=torch.roll(inputs["input_ids"], -1, -1) if name == "packed"
                                        else None)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref_lp, ref_ent = verl_eager_reference(model, temperature, **inputs)
        (ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
        assert out.log_probs.shape == inputs["input_ids"].shape
        torch.testing.assert_close(out.log_probs.double(), ref_lp, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(out.entropy.double(), ref_ent, rtol=1e-5, atol=1e-5, msg=name)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad.float(), rtol=1e-4, atol=1e-6, msg=f"{name} {n}")
        model.zero_grad()


def test_install_backend_routes_impl_backend_sirl(monkeypatch):
    """verl's apply_monkey_patch calls its module-level patch_forward_with_backends; install_verl_backend wraps
    it so impl_backend="sirl" installs forward_with_sirl_kernels and every other value reaches verl's code. With
    verl installed this runs verl's real function, and verl's own fused "torch" forward must agree with ours."""
    monkeypatch.setattr(TinyLlama, "forward", TinyLlama.forward)  # undone after the test
    calls = []
    if HAVE_VERL:
        from verl.models.transformers import monkey_patch

        monkeypatch.setattr(monkey_patch, "patch_forward_with_backends", monkey_patch.patch_forward_with_backends)
    else:
        monkey_patch = types.ModuleType("verl.models.transformers.monkey_patch")
        monkey_patch.patch_forward_with_backends = (
            lambda model, use_fused_kernels=False, fused_kernels_backend=None: calls.append(fused_kernels_backend))
        for name in ("verl", "verl.models", "verl.models.transformers"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "verl.models.transformers.monkey_patch", monkey_patch)
        monkeypatch.setattr(sys.modules["verl.models.transformers"], "monkey_patch", monkey_patch, raising=False)
    install_verl_backend()
    install_verl_backend()  # idempotent
    model = tiny()
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    assert TinyLlama.forward is not forward_with_sirl_kernels
    if HAVE_VERL:
        verl_out = model(input_ids=ids, temperature=0.9, return_dict=True)  # verl's FusedLinearForPPO
    else:
        assert calls == ["torch"]
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="sirl")
    assert TinyLlama.forward is forward_with_sirl_kernels and calls in ([], ["torch"])
    out = model(input_ids=ids, temperature=0.9, return_dict=True)
    assert out.log_probs.shape == out.entropy.shape == ids.shape
    if HAVE_VERL:
        torch.testing.assert_close(out.log_probs, verl_out.log_probs.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.entropy, verl_out.entropy.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAVE_VERL, reason=NO_VERL)
def test_registered_with_real_verl():  # pragma: no cover - needs verl
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.utils.import_utils import load_extern_object

    assert get_reward_manager_cls("sirl") is SIRLRewardManager
    assert load_extern_object("pkg://sirl.integrations.verl", "SIRLRewardManager") is SIRLRewardManager
    assert sirl_verl.register_with_verl()


@pytest.mark.skipif(not HAVE_VERL, reason=NO_VERL)
def test_loaded_by_verl_from_the_documented_config():  # pragma: no cover - needs verl
    """The one-line override of docs/integrations.md, through verl's own load_reward_manager."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import load_reward_manager

    config = OmegaConf.create({"reward": {
        "reward_manager": {"source": "importlib", "name": "SIRLRewardManager",
                           "module": {"path": "pkg://sirl.integrations.verl"}},
        "custom_reward_function": {"path": None}, "sandbox_fusion": None,
        "reward_kwargs": {"truncation": "penalize", "truncation_penalty": -3.0, "reward_source": "surprisal_estimate"},
    }})
    manager = load_reward_manager(config, types.SimpleNamespace(eos_token_id=EOS))
    assert isinstance(manager, SIRLRewardManager) and manager.spec.truncation == "penalize"
    assert manager.reward_source == "surprisal_estimate"
    from verl import DataProto

    tensors, _, _ = rollout_batch()
    out = asyncio.run(manager.run_single(DataProto.from_dict(tensors=tensors)[2:3]))
    assert out["reward_score"] == -3.0  # row 2 is truncated
    assert out["reward_extra_info"]["sirl_reward_key"] == "rollout_log_probs"


# ---------------------------------------------------------------------------------------------------------------
# verl's advantage computation (both trainers call ray_trainer.compute_advantage on the driver)


def verl_compute_advantage():
    """verl's ``compute_advantage``. Importing its trainer module sets ``TORCH_CUDA_ARCH_LIST=8.0`` where CUDA is
    absent (verl/workers/engine/megatron/__init__.py), which must not reach the rest of the session."""
    before = os.environ.get("TORCH_CUDA_ARCH_LIST")
    with warnings.catch_warnings():  # "megatron engine is not available" and the like
        warnings.simplefilter("ignore", UserWarning)
        from verl.trainer.ppo.ray_trainer import compute_advantage

    if before is None:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    return compute_advantage


def grouped_batch():
    """6 rows in 2 groups of 3 (verl's ``uid``), with everything verl's trainers hold when they compute advantages."""
    halves = [rollout_batch(seed) for seed in (0, 1)]
    tensors = {k: torch.cat([h[0][k] for h in halves]) for k in halves[0][0]}
    tensors["response_mask"] = torch.cat([h[1] for h in halves])
    tensors["old_log_probs"] = tensors["rollout_log_probs"] - 0.5
    return tensors, np.array(["a"] * 3 + ["b"] * 3, dtype=object)


@pytest.mark.skipif(not HAVE_VERL, reason=NO_VERL)
def test_grpo_advantages_of_the_reward_manager():  # pragma: no cover - needs verl
    """The manager's scores as ``token_level_rewards``, through verl's ``compute_advantage`` with
    ``adv_estimator=grpo``, equal verl's GRPO on ``sirl.score.sirl_rewards`` of the same entropies (float64)."""
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    compute_advantage = verl_compute_advantage()
    tensors, uid = grouped_batch()
    data = DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid})
    data.batch["token_level_rewards"] = SIRLRewardManager(eos_token_ids=[EOS])(data)
    out = compute_advantage(data, adv_estimator="grpo", config=AlgoConfig())
    rewards, _ = sirl_rewards(tensors["entropys"].double(), tensors["response_mask"], torch.zeros(6, dtype=torch.bool))
    # GRPO scores a response by the sum of its token-level rewards
    expected, _ = compute_grpo_outcome_advantage(rewards[:, None], tensors["response_mask"].double(), uid)
    torch.testing.assert_close(out.batch["advantages"].double(), expected, rtol=1e-6, atol=1e-6)
    assert out.batch["advantages"].abs().sum() > 0


@pytest.mark.skipif(not HAVE_VERL, reason=NO_VERL)
def test_verl_gives_registered_estimators_no_log_probs(monkeypatch):  # pragma: no cover - needs verl
    """Why SIRL is a reward manager and not an advantage estimator: verl 0.9.1's ``compute_advantage``, called
    after the old-log-prob pass, hands an estimator selected by ``algorithm.adv_estimator=<name>`` the rewards,
    the response mask, ``uid`` and the algorithm config; never the batch, its log-probs or its entropies."""
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos

    compute_advantage = verl_compute_advantage()
    seen = {}

    def probe(**kwargs):
        seen.update(kwargs)
        return kwargs["token_level_rewards"], kwargs["token_level_rewards"]

    monkeypatch.setitem(core_algos.ADV_ESTIMATOR_REGISTRY, "sirl_probe", probe)
    tensors, uid = grouped_batch()
    tensors["token_level_rewards"] = torch.zeros_like(tensors["entropys"])
    data = DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid})
    assert {"old_log_probs", "rollout_log_probs", "entropys"} <= set(data.batch.keys())
    compute_advantage(data, adv_estimator="sirl_probe", config=AlgoConfig())
    assert set(seen) == {"token_level_rewards", "response_mask", "index", "config"}
