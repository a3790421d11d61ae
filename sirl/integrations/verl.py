"""SIRL for verl (Ray clusters): a reward manager and a fused log-prob/entropy forward for the actor.

This module imports without verl; verl itself is imported only by :func:`register_with_verl`,
:func:`install_verl_backend` and :func:`setup_worker` (and, when verl is installed, on import, to register the
reward manager under the name ``"sirl"``). Written against verl 0.9.1's interfaces:

**Reward manager** (``SIRLRewardManager``). Reads the per-response-token values that verl puts in the batch and
writes minus their mean at the last response token (``rm_scores[i, valid_response_length - 1]``, the
placement of verl's own managers). Which values it reads is the ``reward_source`` option (no silent fallback):

- ``entropy`` (default): ``entropys`` (or ``entropy``), the actor's per-token entropy; the exact SIRL reward.
- ``surprisal_estimate``: ``old_log_probs``, else ``rollout_log_probs``, log-probs of the sampled tokens. Their
  negation, the surprisal of the sampled token, has the entropy of the sampling distribution as its
  expectation, so the reward is an unbiased one-sample estimate of the SIRL reward (exact in expectation when
  the log-probs are those of the sampling distribution: verl's default ``rollout.logprobs_mode=processed_logprobs``,
  or temperature 1).

A batch without the chosen source's tensors raises ``KeyError`` naming them. The source and the batch key used go
into every result's ``reward_extra_info`` (``sirl_reward_source``, ``sirl_reward_key``).

Select it with one line of Hydra overrides (``pkg://`` makes verl import this module in every reward worker)::

    reward.reward_manager.source=importlib reward.reward_manager.name=SIRLRewardManager \\
        reward.reward_manager.module.path=pkg://sirl.integrations.verl

Options come from ``reward.reward_kwargs``: ``+reward.reward_kwargs.reward_source=surprisal_estimate``, and
those of ``sirl train`` (``sirl.reward.RewardSpec``, spelled the same): ``+reward.reward_kwargs.truncation=mask`` and
likewise ``reward`` (``neg_entropy`` | ``entropy``), ``reward_aggregation``, ``reward_last_k``,
``truncation_penalty``. verl 0.9.1's streaming reward loop hands reward managers token ids only, so there either
source raises (see docs/integrations.md for which verl paths carry log-probs to the reward). SIRL is not offered
as an advantage estimator (``algorithm.adv_estimator=<name>``): verl 0.9.1's ``compute_advantage`` passes a
registered estimator the rewards, the response mask, the ``uid`` index and the algorithm config, never the
batch's log-probs or entropies.

**Fused forward** (``forward_with_sirl_kernels``). A drop-in for verl's ``forward_with_torch_backend``: same
arguments, and an output whose ``log_probs`` and ``entropy`` ``[B, T]`` follow verl's alignment (position t
scores ``shift_labels[t]``, else ``labels`` / ``input_ids`` rolled by -1), computed by
``sirl_kernels.linear_token_logprobs_entropy`` from the hidden states without materialising logits. verl's
engine calls it whenever ``use_fused_kernels`` is on; to select it::

    actor_rollout_ref.model.use_fused_kernels=True actor_rollout_ref.model.fused_kernel_options.impl_backend=sirl \\
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=sirl.integrations.verl.setup_worker

**What is tested.** verl 0.9.1 pins transformers<5.11, so ``scripts/setup.sh`` installs it apart from the venv, in
``.venv/verl-overlay``, and CI runs tests/sirl/integrations/test_verl.py against verl's real modules: ``DataProto``,
both reward-manager registries, ``load_reward_manager`` on the config above, ``ray_trainer.compute_advantage``
(GRPO on the manager's scores) and ``patch_forward_with_backends`` (verl's fused forward against this one). Not
run: Ray, the FSDP engine, a rollout server, the reward loop's workers, ``main_ppo`` end to end.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from sirl.reward import FIELDS as REWARD_OPTIONS
from sirl.reward import RewardSpec
from sirl.scoring import sirl_rewards
from sirl_kernels.api import linear_token_logprobs_entropy
from sirl_kernels.hf import fused_head_problem, model_logit_temperature, output_head

VERL_INSTALL = (
    "this needs verl (pip install verl; the integration is written against verl 0.9.1, whose own pins require "
    "transformers<5.11 and Ray)"
)
REGISTERED_NAME = "sirl"
ENTROPY_KEYS = ("entropys", "entropy")  # exact: the actor's per-token entropy
LOGPROB_KEYS = ("old_log_probs", "rollout_log_probs")  # one-sample estimate: -log p(sampled token)
REWARD_SOURCES = ("entropy", "surprisal_estimate")


# ---------------------------------------------------------------------------------------------------------------
# the reward, on plain tensors


def check_reward_source(reward_source: str) -> str:
    if reward_source not in REWARD_SOURCES:
        raise ValueError(f"reward_source must be one of {', '.join(REWARD_SOURCES)}, got {reward_source!r}")
    return reward_source


def response_per_token_values(batch, reward_source: str = "entropy") -> tuple[Tensor, str]:
    """``(values [B, R], key)``: the per-token quantity whose completion mean is minus the SIRL reward: the
    entropies (``reward_source="entropy"``) or the sampled tokens' surprisals (``"surprisal_estimate"``)."""
    exact = check_reward_source(reward_source) == "entropy"
    for key in ENTROPY_KEYS if exact else LOGPROB_KEYS:
        if key in batch.keys():
            return (batch[key].float() if exact else -batch[key].float()), key
    present = sorted(batch.keys())
    if exact:
        raise KeyError(
            f"reward_source='entropy' needs the actor's per-token entropies ({' or '.join(ENTROPY_KEYS)}) in the "
            f"batch, which has only {present}; to use the one-sample estimate from {' or '.join(LOGPROB_KEYS)} "
            "instead, choose reward_source='surprisal_estimate' (+reward.reward_kwargs.reward_source="
            "surprisal_estimate; docs/integrations.md)"
        )
    raise KeyError(
        f"reward_source='surprisal_estimate' needs log-probs of the sampled tokens ({' or '.join(LOGPROB_KEYS)}) "
        f"in the batch, which has only {present}: verl puts rollout_log_probs there with "
        "actor_rollout_ref.rollout.calculate_log_probs=True where the reward is computed on the whole batch; its "
        "streaming reward loop passes token ids only (docs/integrations.md)"
    )


def sirl_response_rewards(per_token: Tensor, response_mask: Tensor, responses: Tensor, eos_token_ids,
                          spec: RewardSpec = RewardSpec()) -> tuple[Tensor, Tensor]:
    """``(rewards [B], valid [B])`` from per-token entropies (or surprisals) over the response tokens.

    A response is truncated when its last valid token is not an eos token (verl stops at eos or at
    ``response_length``); ``spec.truncation`` then applies as in ``sirl.scoring.sirl_rewards``.
    """
    mask = response_mask.bool()
    lengths = mask.long().sum(-1)
    last = responses.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
    eos = torch.as_tensor(list(eos_token_ids), device=responses.device)
    truncated = (lengths == 0) | ~torch.isin(last, eos)
    return sirl_rewards(per_token, mask, truncated, spec)


def last_token_scores(rewards: Tensor, valid_response_length: Tensor, width: int) -> Tensor:
    """``[B, width]`` float32 zeros with ``rewards[i]`` at ``valid_response_length[i] - 1`` (verl's placement)."""
    scores = torch.zeros(rewards.shape[0], width, dtype=torch.float32, device=rewards.device)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    scores[rows, (valid_response_length.long() - 1).clamp_min(0)] = rewards.float()
    return scores


# ---------------------------------------------------------------------------------------------------------------
# the reward manager (verl's reward-loop contract, ``run_single``, and the older ``__call__`` contract)


def _reward_kwargs(config) -> dict:
    if config is None:
        return {}
    reward = config.get("reward", None) if hasattr(config, "get") else getattr(config, "reward", None)
    kwargs = (reward.get("reward_kwargs", None) if reward is not None and hasattr(reward, "get") else None) or {}
    return dict(kwargs)


class SIRLRewardManager:
    """verl reward manager for the SIRL reward (see the module docstring).

    Accepts the constructor arguments of both of verl's manager families (``config, tokenizer, compute_score,
    **kwargs`` and ``tokenizer, num_examine, compute_score, reward_fn_key``); ``compute_score`` is not used.
    ``reward_source``: ``"entropy"`` (default) or ``"surprisal_estimate"``; see the module docstring.
    """

    def __init__(self, config=None, tokenizer=None, compute_score=None, *, num_examine: int = 0,
                 reward_source: str | None = None, eos_token_ids=None, **kwargs):
        self.config, self.tokenizer, self.compute_score = config, tokenizer, compute_score
        self.num_examine = num_examine
        given = _reward_kwargs(config)
        unknown = sorted(set(given) - set(REWARD_OPTIONS) - {"reward_source"})
        if unknown:
            raise ValueError(f"reward.reward_kwargs: unknown option(s) {', '.join(unknown)}; SIRLRewardManager takes "
                             f"reward_source and {', '.join(REWARD_OPTIONS)}")
        self.reward_source = check_reward_source(reward_source or given.get("reward_source", "entropy"))
        options = {**given, **{k: v for k, v in kwargs.items() if k in REWARD_OPTIONS}}
        self.spec = RewardSpec.from_options(options)
        if self.spec.reward == "random":
            raise ValueError("reward='random' is an ablation of sirl train (it needs the run's step and row keys)")
        if self.spec.reward == "self_certainty":  # the manager reads verl's entropies
            raise ValueError("reward='self_certainty' is not available in the verl manager yet (it reads verl's "
                             "entropies); use sirl train reward=self_certainty")
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = list(eos_token_ids)
        if not self.eos_token_ids and self.spec.truncation != "keep":
            raise ValueError("truncation='mask'/'penalize' needs eos_token_ids (or a tokenizer with an eos token)")

    def scores(self, data) -> tuple[Tensor, Tensor, str]:
        """``(rewards [B], valid [B], source key)`` for a verl ``DataProto`` (or anything with ``.batch``)."""
        batch = data.batch
        responses = batch["responses"]
        width = responses.shape[-1]
        if "response_mask" in batch.keys():  # policy tokens only (multi-turn: tool output is 0)
            response_mask = batch["response_mask"]
        else:
            response_mask = batch["attention_mask"][:, -width:]
        per_token, key = response_per_token_values(batch, self.reward_source)
        rewards, valid = sirl_response_rewards(per_token, response_mask, responses, self.eos_token_ids or [-1],
                                               self.spec)
        return rewards, valid, key

    @staticmethod
    def _valid_response_length(data) -> Tensor:
        width = data.batch["responses"].shape[-1]
        return data.batch["attention_mask"][:, -width:].sum(-1)

    def __call__(self, data, return_dict: bool = False):
        """Older contract: the ``[B, R]`` token-level score tensor (reward at the last response token)."""
        rewards, valid, key = self.scores(data)
        rewards = torch.where(valid, rewards, torch.zeros_like(rewards))  # "mask": no SIRL signal
        tensor = last_token_scores(rewards, self._valid_response_length(data), data.batch["responses"].shape[-1])
        if not return_dict:
            return tensor
        rows = len(rewards)
        return {"reward_tensor": tensor, "reward_extra_info": {
            "sirl_reward": rewards.tolist(), "sirl_valid": valid.tolist(),
            "sirl_reward_source": [self.reward_source] * rows, "sirl_reward_key": [key] * rows,
        }}

    async def run_single(self, data) -> dict:
        """verl's reward-loop contract: one trajectory in, ``{"reward_score", "reward_extra_info"}`` out."""
        rewards, valid, key = self.scores(data[-1:])
        score = float(rewards[0]) if bool(valid[0]) else 0.0
        return {"reward_score": score, "reward_extra_info": {
            "sirl_reward": score, "sirl_valid": bool(valid[0]), "sirl_reward_source": self.reward_source,
            "sirl_reward_key": key,
        }}

    @classmethod
    def assemble_rm_scores(cls, data, scores: list[float]) -> Tensor:
        """``rm_scores`` for a batch from one score per trajectory (verl's ``RewardManagerBase`` contract)."""
        width = data.batch["responses"].shape[-1]
        return last_token_scores(torch.as_tensor(scores, dtype=torch.float32), cls._valid_response_length(data),
                                 width)


def register_with_verl() -> list[str]:
    """Registers ``SIRLRewardManager`` as ``"sirl"`` in whichever of verl's registries exist; returns them."""
    done = []
    for module in ("verl.experimental.reward_loop.reward_manager", "verl.workers.reward_manager"):
        try:
            registry = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        try:
            registry.register(REGISTERED_NAME)(SIRLRewardManager)
        except ValueError:  # this file loaded twice (importlib by path): the first registration stands
            pass
        done.append(module)
    if not done:
        raise ImportError(f"register_with_verl: {VERL_INSTALL}")
    return done


# ---------------------------------------------------------------------------------------------------------------
# fused log-probs and entropy for verl's actor


@functools.cache
def output_class():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class SIRLCausalLMOutputForPPO(CausalLMOutputWithPast):
        """verl's ``CausalLMOutputForPPO`` fields: the engine reads ``log_probs`` and ``entropy``."""

        log_probs: Tensor | None = None
        entropy: Tensor | None = None

    return SIRLCausalLMOutputForPPO


def fused_linear_for_ppo(hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0,
                         bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Drop-in for verl's ``FusedLinearForPPO().forward``: ``(log_probs, entropy)`` shaped like ``input_ids``
    (here: the labels of each row of ``hidden_states``), float32, differentiable, no ``[N, V]`` logits."""
    return linear_token_logprobs_entropy(hidden_states, vocab_weights, input_ids.long(), bias=bias,
                                         temperature=temperature)


def forward_with_sirl_kernels(
    self,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    past_key_values=None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    cache_position: Tensor | None = None,
    logits_to_keep=0,
    temperature: float = 1.0,
    shift_labels: Tensor | None = None,
    **loss_kwargs,
):
    """A ``*ForCausalLM.forward`` with the signature of verl's ``forward_with_torch_backend``: the decoder body,
    then log-prob and entropy of every position's next token from the hidden states (``sirl_kernels``)."""
    if return_dict is False:
        raise NotImplementedError("forward_with_sirl_kernels has to return_dict")
    outputs = self.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
    )
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_sirl_kernels needs labels, shift_labels or input_ids")
    weight, bias = output_head(self)  # a missing or wrapped head is an error, never a silent wrong logit
    hidden = outputs.last_hidden_state
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    log_probs, entropy = fused_linear_for_ppo(
        hidden, weight, rolled, model_logit_temperature(self.config, float(temperature)), bias=bias
    )
    return output_class()(
        log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions,
    )


def patch_forward(model) -> None:
    """Installs ``forward_with_sirl_kernels`` on the model's class, as verl's ``patch_forward_with_backends``
    does for its own backends; refuses (``NotImplementedError``) a model whose logits the fused head cannot
    reproduce (``sirl_kernels.hf.fused_head_problem``), before anything is patched."""
    problem = fused_head_problem(model)
    if problem is not None:
        raise NotImplementedError(f"impl_backend=sirl cannot serve {type(model).__name__}: {problem}")
    model.__class__.forward = forward_with_sirl_kernels
    model._verl_fused_kernels_backend = REGISTERED_NAME


def install_verl_backend() -> None:
    """Teaches verl's ``patch_forward_with_backends`` the ``fused_kernel_options.impl_backend=sirl`` value."""
    try:
        from verl.models.transformers import monkey_patch
    except ImportError as exc:
        raise ImportError(f"install_verl_backend: {VERL_INSTALL}") from exc
    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "_sirl", False):
        return

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend == REGISTERED_NAME:
            return patch_forward(model)
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends._sirl = True
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: registers the reward manager and the ``sirl`` fused-kernel backend in
    every worker process of the job."""
    register_with_verl()
    install_verl_backend()


try:  # with verl installed, importing this module (e.g. through pkg://) registers "sirl"
    import verl  # noqa: F401
except ImportError:
    pass
else:  # pragma: no cover - needs verl
    register_with_verl()
