"""SIRL inside TRL's ``GRPOTrainer``: the fused kernels for every log-prob pass, the policy's own entropy as a reward.

``SIRLGRPOTrainer`` changes two things and leaves the rest of TRL (generation, vLLM, accelerate / DeepSpeed
data parallelism, reward weighting and normalisation, the loss, logging) as it is:

1. **Log-probs from hidden states.** TRL computes per-token log-probs by calling the model with
   ``labels=..., fused_lm_head=True`` (its ``add_fused_lm_head`` patch on the model's ``forward``). The trainer
   re-patches that entry point so the policy, old-policy and reference passes run the decoder body and then
   ``sirl_kernels.linear_token_logprobs_entropy`` on the hidden states of the scored positions (the same path as
   ``sirl.score``; tied embeddings and PEFT adapters are handled by ``sirl_kernels.hf``). The call still goes
   through the model's ``forward``, so DistributedDataParallel and DeepSpeed ZeRO-1/2 see an ordinary forward
   and reduce gradients as usual. Under FSDP or ZeRO-3 (sharded ``lm_head``) and for multimodal inputs TRL's
   own head is kept; it is also logits-free, and the reward below works the same on it.

2. **The SIRL reward, with no extra forward pass.** The policy's entropies at the sampling temperature become
   reward function number 0, named ``"sirl"``: minus the mean entropy over each completion's generated tokens,
   with the truncation options of ``sirl train`` (``sirl.score.sirl_rewards``). TRL weights it with
   ``reward_weights`` and normalises it per group together with any reward functions you pass. Where the
   entropies come from (``SIRLGRPOConfig.sirl_reward_pass``):

   - TRL runs a no-grad old-policy pass (``gradient_accumulation_steps`` not a multiple of
     ``steps_per_generation * num_iterations``, or vLLM importance sampling): they are read off that pass.
   - TRL's default on-policy setting, where it runs no such pass (``"loss"``, chosen by ``"auto"``): the policy
     has not changed between sampling and every loss computation of the batch (that is why TRL may skip the
     pass), so the training forward's own entropies are the sampling policy's. The trainer keeps each
     prompt's group together in one micro-batch, and computes the rewards, the combined reward and the group
     advantages inside ``compute_loss``, from the forward the loss runs anyway, before the loss reads them.
     This needs ``per_device_train_batch_size`` to be a multiple of ``num_generations`` and per-group
     statistics (``scale_rewards`` "group" or "none", ``multi_objective_aggregation="sum_then_normalize"``).
   - Otherwise (``"policy_pass"``, or ``"auto"`` where the settings above do not hold, with a warning that
     says why) the trainer runs the one no-grad policy pass itself, as ``sirl train`` does.

Usage::

    from sirl.integrations.trl import SIRLGRPOConfig, SIRLGRPOTrainer
    args = SIRLGRPOConfig(output_dir="out", num_generations=4, sirl_truncation="keep")
    trainer = SIRLGRPOTrainer(model, args=args, train_dataset=prompts)   # reward_funcs=[...] optional
    trainer.train()

Tested with trl 1.16.0 (the ``[trl]`` extra pins the range).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
import warnings
from dataclasses import dataclass, field

import torch

from sirl.reward import RewardSpec
from sirl.scoring import sirl_rewards
from sirl_kernels.hf import causal_lm_token_logprobs_entropy, fused_head_problem

TRL_INSTALL = "sirl.integrations.trl needs TRL >= 1.16: pip install 'sirl-kernels[trl]' (tested with trl==1.16.0)"

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import utils as trl_utils
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(TRL_INSTALL) from exc
if not hasattr(trl_utils, "add_fused_lm_head"):  # pragma: no cover
    raise ImportError(f"{TRL_INSTALL}; found trl {trl.__version__}, which has no fused LM head entry point")

from accelerate.utils import is_peft_model  # noqa: E402  (after the trl check: accelerate comes with trl)
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

SIRL_REWARD_NAME = "sirl"
# What a text-only log-prob call may carry besides None/False values (PEFT forwards e.g. inputs_embeds=None);
# anything else (pixel_values, output_router_logits=True, shift_labels, ...) goes to TRL's own head.
_PASSIVE_KWARGS = ("input_ids", "attention_mask", "use_cache", "return_dict")


def _reward_fields() -> list[tuple]:
    """``RewardSpec``'s options as ``sirl_``-prefixed dataclass fields (defaults and docs from the spec): the
    reward's options are defined once, in ``sirl/reward.py``."""
    hints = typing.get_type_hints(RewardSpec)
    return [(f"sirl_{f.name}", hints[f.name], field(default=f.default, metadata={"help": f.metadata["doc"]}))
            for f in dataclasses.fields(RewardSpec)]


_SIRLRewardOptions = dataclasses.make_dataclass("_SIRLRewardOptions", _reward_fields())


@dataclass
class SIRLGRPOConfig(GRPOConfig, _SIRLRewardOptions):
    """``GRPOConfig`` plus the SIRL reward's options (``sirl_`` + each ``sirl.reward.RewardSpec`` field: the same
    as ``sirl train``'s ``reward``, ``reward_*`` and ``truncation*`` keys)."""

    sirl_reward_pass: str = field(
        default="auto",
        metadata={
            "help": "Where the SIRL reward's entropies come from when TRL runs no old-policy pass: 'loss' (the "
            "training forward: no extra pass; needs per_device_train_batch_size a multiple of num_generations "
            "and per-group reward scaling), 'policy_pass' (one extra no-grad policy pass per generation batch) "
            "or 'auto' ('loss' where possible, else 'policy_pass' with a warning)."
        },
    )
    sirl_fused_logps: bool = field(
        default=True, metadata={"help": "Compute log-probs and entropies with sirl_kernels (False: TRL's own head)."}
    )


def _reward_spec(args) -> RewardSpec:
    """The SIRL reward of ``args`` (defaults for a plain ``GRPOConfig``), validated like ``sirl train``'s."""
    spec = RewardSpec.from_options(vars(args), prefix="sirl_")
    if spec.reward == "random":
        raise ValueError("sirl_reward='random' is an ablation of sirl train (it needs the run's step and row keys)")
    if spec.reward == "self_certainty":  # the plug-in reads the entropies of TRL's own passes
        raise ValueError("sirl_reward='self_certainty' is not available in the TRL plug-in yet (it reads TRL's "
                         "entropies); use sirl train reward=self_certainty")
    return spec


def adapters_off(model) -> bool:
    """True while a PEFT model computes TRL's reference: adapters disabled, or TRL's frozen "ref" adapter active
    (False for a model without adapters)."""
    if not is_peft_model(model):
        return False
    if "ref" in model.peft_config and model.active_adapter == "ref":
        return True
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next((m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)), False)


def add_sirl_lm_head(model, temperature: float = 1.0) -> None:
    """Re-patches a model that TRL gave a fused LM head: text-only ``model(input_ids=..., attention_mask=...,
    labels=..., fused_lm_head=True)`` calls are answered by ``sirl_kernels`` from the hidden states (same output
    fields: ``log_probs`` and ``entropy`` ``[B, T - 1]``, zero where the shifted label is -100, ``label_mask`` and
    ``loss``); every other call goes to the forward that was there before (TRL's head, or plain generation)."""
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        input_ids = kwargs.get("input_ids")
        extra = [k for k, v in kwargs.items() if k not in _PASSIVE_KWARGS and v is not None and v is not False]
        if not fused_lm_head or args or extra or labels is None or input_ids is None:
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        scored = labels != -100
        if not torch.equal(torch.where(scored, labels, input_ids), input_ids):  # labels that are not the inputs
            return previous(fused_lm_head=True, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logprobs, entropy = causal_lm_token_logprobs_entropy(
            self, input_ids, attention_mask, scored.long(), temperature=temperature
        )
        label_mask = scored[:, 1:]
        log_probs = logprobs[:, 1:]
        count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return trl_utils.FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy[:, 1:], label_mask=label_mask
        )

    model.forward = types.MethodType(forward, model)


def _choose_reward_pass(args, num_generations: int) -> str:
    """Where the SIRL reward's entropies come from: "old_policy_pass" (TRL runs one), "loss" or "policy_pass"
    (see the module docstring). Warns when "auto" has to add a pass; raises for an impossible "loss"."""
    requested = getattr(args, "sirl_reward_pass", "auto")
    if requested not in ("auto", "loss", "policy_pass"):
        raise ValueError(f"sirl_reward_pass must be 'auto', 'loss' or 'policy_pass', got {requested!r}")
    generate_every = args.steps_per_generation * args.num_iterations
    if args.gradient_accumulation_steps % generate_every != 0 or (
        args.use_vllm and args.vllm_importance_sampling_correction
    ):
        return "old_policy_pass"  # TRL's own no-grad pass supplies the entropies at no extra cost
    if requested == "policy_pass":
        return "policy_pass"
    why = None
    if args.per_device_train_batch_size % num_generations:
        why = (f"per_device_train_batch_size={args.per_device_train_batch_size} is not a multiple of "
               f"num_generations={num_generations}, so a prompt's group spans micro-batches")
    elif args.multi_objective_aggregation != "sum_then_normalize" or args.scale_rewards == "batch":
        why = ("the advantages need statistics over the whole generation batch (scale_rewards='batch' or "
               "multi_objective_aggregation='normalize_then_sum')")
    if why is None:
        return "loss"
    if requested == "loss":
        raise ValueError(f"sirl_reward_pass='loss' cannot be used: {why}")
    warnings.warn(f"SIRLGRPOTrainer runs one extra no-grad policy pass per generation batch for the SIRL reward: "
                  f"{why}. Without it, the reward comes from the training forward.", stacklevel=4)
    return "policy_pass"


class _SIRLReward:
    """Reward function 0 of the trainer: TRL calls it like any reward function and weights, normalises and logs
    its column (``rewards/sirl/mean``); the values come from the entropies of the policy pass."""

    def __init__(self):
        self.__name__ = SIRL_REWARD_NAME
        self.trainer = None

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        if self.trainer._sirl_reward_in_loss():
            return [0.0] * len(completion_ids)  # a placeholder: compute_loss fills in the reward (see the module)
        return self.trainer._sirl_reward_values(completion_ids)


class SIRLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with SIRL's reward and the fused log-prob/entropy kernels (see the module docstring).

    Takes ``GRPOTrainer``'s arguments (those after ``args`` by keyword). ``reward_funcs`` is optional: the SIRL
    reward is always reward function 0, so ``args.reward_weights``, when given, lists its weight first. Options
    come from ``SIRLGRPOConfig``'s ``sirl_*`` fields (a plain ``GRPOConfig`` gets their defaults).
    ``sirl_reward_pass`` says where the reward's entropies came from: "loss" (the training forward),
    "old_policy_pass" (TRL's own) or "policy_pass" (one the trainer adds).
    """

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, **kwargs):
        if reward_funcs is None:
            user_funcs = []
        else:
            user_funcs = list(reward_funcs) if isinstance(reward_funcs, list) else [reward_funcs]
        reward_pass = None
        if args is not None:
            reward_pass = _choose_reward_pass(args, args.num_generations)  # fail fast, before the model is set up
            self._sirl_spec = _reward_spec(args)
            if args.reward_weights is not None and len(args.reward_weights) != len(user_funcs) + 1:
                raise ValueError(
                    f"reward_weights has {len(args.reward_weights)} entries for {len(user_funcs) + 1} reward "
                    "functions: the SIRL reward is reward function 0, so list its weight first"
                )
            if args.mask_truncated_completions and self._sirl_spec.truncation == "keep":
                raise ValueError(
                    "mask_truncated_completions=True hides truncated completions from every forward pass, so "
                    "their entropy is unknown: set sirl_truncation='mask' (the same exclusion) or 'penalize'"
                )
        processing = kwargs.get("reward_processing_classes")
        if processing is not None:
            processing = list(processing) if isinstance(processing, list) else [processing] * len(user_funcs)
            kwargs["reward_processing_classes"] = [None, *processing]
        sirl_reward = _SIRLReward()
        super().__init__(model, reward_funcs=[sirl_reward, *user_funcs], args=args, **kwargs)
        if args is None:
            self._sirl_spec = _reward_spec(self.args)
        if self._is_vlm:
            raise NotImplementedError("SIRLGRPOTrainer supports text-only causal LMs")
        sirl_reward.trainer = self
        self._sirl_rollout = None  # (prompt_ids, completion_ids, tool_mask) of the current generation batch
        self._sirl_entropy = None  # [B, C] entropies of its completion tokens, once the policy pass has run
        self._sirl_want_entropy = False
        self._sirl_logps_signature = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies)
        self._sirl_loss_inputs = None  # the micro-batch whose rewards the training forward is about to supply
        self._sirl_rewards_per_func = None  # TRL's [B_global, F] reward matrix of the current generation batch
        self.sirl_reward_pass = reward_pass or _choose_reward_pass(self.args, self.num_generations)
        self.sirl_kernels_head = False
        if getattr(self.args, "sirl_fused_logps", True):
            self.sirl_kernels_head = self._install_sirl_head()

    # ---- fused log-probs ------------------------------------------------------------------------------------

    def _install_sirl_head(self) -> bool:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            warnings.warn("FSDP / ZeRO-3 shard lm_head: SIRLGRPOTrainer keeps TRL's fused head there", stacklevel=3)
            return False
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        models = [policy] + ([self.accelerator.unwrap_model(self.ref_model)] if self.ref_model is not None else [])
        for m in models:
            reason = fused_head_problem(m)
            if reason is not None:
                warnings.warn(f"sirl_kernels cannot score this model ({reason}); keeping TRL's head", stacklevel=3)
                return False
        for m in models:
            add_sirl_lm_head(m, temperature=self.temperature)
        return True

    # ---- the policy pass and its entropies ------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        bound = self._sirl_logps_signature.bind(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        wanted = bound.arguments.get("compute_entropy", False)
        policy = self.accelerator.unwrap_model(model) is self.accelerator.unwrap_model(self.model) and not (
            adapters_off(self.accelerator.unwrap_model(model))
        )
        capture = self._sirl_want_entropy and not torch.is_grad_enabled() and policy
        in_loss = self._sirl_loss_inputs is not None and torch.is_grad_enabled() and policy
        bound.arguments["compute_entropy"] = wanted or capture or in_loss
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*bound.args[1:], **bound.kwargs)
        if capture:
            self._sirl_entropy = entropies.detach()
            self._sirl_want_entropy = False
        if in_loss:  # the training forward of compute_loss: set the advantages before _compute_loss reads them
            inputs, self._sirl_loss_inputs = self._sirl_loss_inputs, None
            inputs["advantages"] = self._sirl_advantages_in_loss(inputs, entropies.detach())
        return logps, entropies if wanted else None, aux

    def _generate(self, prompts):
        out = super()._generate(prompts)
        self._sirl_rollout = (out[0], out[1], out[2])  # prompt_ids, completion_ids, tool_mask
        self._sirl_entropy = None
        # the next no-grad policy pass (TRL's old-policy pass) supplies them, unless the training forward will
        self._sirl_want_entropy = not self._sirl_reward_in_loss()
        return out

    def _sirl_policy_pass(self) -> None:
        """The no-grad policy pass over this generation batch, for when TRL does not run one itself."""
        prompt_ids, completion_ids, _ = self._sirl_rollout
        device, pad_id = self.accelerator.device, self._tokenizer.pad_token_id

        def padded(rows, value, side):
            return trl_utils.pad([torch.tensor(r, dtype=torch.long) for r in rows], padding_value=value,
                                 padding_side=side).to(device)

        ones = [[1] * len(r) for r in prompt_ids], [[1] * len(r) for r in completion_ids]
        completions = padded(completion_ids, pad_id, "right")
        input_ids = torch.cat([padded(prompt_ids, pad_id, "left"), completions], 1)
        attention_mask = torch.cat([padded(ones[0], 0, "left"), padded(ones[1], 0, "right")], 1)
        train = self.model.training
        batch_size = self.args.per_device_train_batch_size if train else self.args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, completions.size(1), batch_size=batch_size
            )

    def _sirl_reward_values(self, completion_ids: list[list[int]]) -> list[float | None]:
        """One SIRL reward per local completion (None = no reward: a truncated completion under "mask")."""
        if self._sirl_rollout is None or len(self._sirl_rollout[1]) != len(completion_ids):
            raise RuntimeError("the SIRL reward is computed from the trainer's own generation batch")
        if self._sirl_entropy is None:
            self._sirl_policy_pass()
        entropy = self._sirl_entropy.float()
        mask, truncated = self._sirl_token_mask_and_truncated(completion_ids, entropy.shape[1], entropy.device)
        rewards, valid = sirl_rewards(entropy, mask, truncated, self._sirl_spec)
        return [r if v else None for r, v in zip(rewards.tolist(), valid.tolist())]

    def _sirl_token_mask_and_truncated(self, completion_ids: list[list[int]], width: int, device):
        """``(mask [B, width], truncated [B])``: which completion positions are generated tokens (tool or
        environment output inside a completion is not the policy's), and which completions hit the length cap."""
        lengths = torch.tensor([len(ids) for ids in completion_ids], device=device)
        mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        tool_mask = self._sirl_rollout[2]
        if tool_mask is not None:
            tools = trl_utils.pad([torch.tensor(m, dtype=torch.long) for m in tool_mask], padding_value=0)
            mask &= tools[:, :width].to(device).bool()
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        truncated = torch.tensor([not ids or ids[-1] not in eos_and_pad for ids in completion_ids], device=device)
        return mask, truncated

    # ---- the reward from the training forward (sirl_reward_pass="loss") -----------------------------------

    def _sirl_reward_in_loss(self) -> bool:
        return self.sirl_reward_pass == "loss" and self.model.training

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._sirl_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self._sirl_reward_in_loss():
            return out
        # TRL logged statistics of the placeholder rewards: they are logged again from compute_loss
        metrics = self._metrics["train"]
        sirl_keys = (f"rewards/{SIRL_REWARD_NAME}/mean", f"rewards/{SIRL_REWARD_NAME}/std")
        for key in ("reward", "reward_std", "frac_reward_zero_std", *sirl_keys):
            metrics[key].pop()
        local = out["completion_ids"].size(0)
        rank, device = self.accelerator.process_index, out["completion_ids"].device
        width = out["completion_ids"].size(1)
        token_mask, truncated = self._sirl_token_mask_and_truncated(self._sirl_rollout[1], width, device)
        table_start = len(self._logs["advantages"]) - local * self.accelerator.num_processes
        out["sirl_rewards_per_func"] = self._sirl_rewards_per_func[rank * local:(rank + 1) * local].to(device)
        out["sirl_token_mask"] = token_mask
        out["sirl_truncated"] = truncated
        out["sirl_table_row"] = torch.arange(local, device=device) + rank * local + table_start
        out["advantages"] = torch.full_like(out["advantages"], float("nan"))  # never used: compute_loss sets them
        return out

    def _prepare_inputs(self, generation_batch):
        if not self._sirl_reward_in_loss():
            return super()._prepare_inputs(generation_batch)
        # TRL's _prepare_inputs, except that the shuffle moves whole groups, so every micro-batch holds complete
        # groups (the generation batch lists each prompt's num_generations completions consecutively).
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            size = batch["completion_ids"].size(0)
            groups = torch.randperm(size // self.num_generations)
            order = (groups[:, None] * self.num_generations + torch.arange(self.num_generations)).flatten()
            batch = {k: _take_rows(v, order) for k, v in batch.items()}
            self._buffered_inputs = trl_utils.split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "sirl_rewards_per_func" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._sirl_loss_inputs = inputs
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            missed, self._sirl_loss_inputs = self._sirl_loss_inputs, None
        if missed is not None:
            raise RuntimeError("the SIRL reward was not computed: compute_loss ran no policy forward with entropies")
        return loss

    def _sirl_advantages_in_loss(self, inputs: dict, entropy: torch.Tensor) -> torch.Tensor:
        """The SIRL rewards of this micro-batch from the training forward's entropies, combined with the other
        reward functions' values and normalised per group exactly as TRL does it at generation time."""
        sirl, valid = sirl_rewards(entropy.float(), inputs["sirl_token_mask"], inputs["sirl_truncated"],
                                   self._sirl_spec)
        rewards_per_func = inputs["sirl_rewards_per_func"].clone()
        rewards_per_func[:, 0] = torch.where(valid, sirl, torch.full_like(sirl, float("nan")))
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        rewards[unscorable] = float("nan")
        grouped = rewards.view(-1, self.num_generations)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(self.num_generations)
        if self.num_generations > 1:
            std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(self.num_generations)
        else:
            std = torch.zeros_like(rewards)
        advantages = rewards - mean
        if self.scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        self._sirl_log_in_loss(rewards_per_func[:, 0], rewards, std, advantages, inputs["sirl_table_row"])
        return advantages

    def _sirl_log_in_loss(self, sirl, rewards, std, advantages, table_rows) -> None:
        """TRL's reward metrics and completions-table columns, gathered over ranks (every rank reaches here once
        per micro-step, so the collective is matched)."""
        stats = self.accelerator.gather(torch.stack([sirl, rewards, std, advantages], dim=1).float())
        rows = self.accelerator.gather(table_rows)
        metrics = self._metrics["train"]
        metrics[f"rewards/{SIRL_REWARD_NAME}/mean"].append(torch.nanmean(stats[:, 0]).item())
        metrics[f"rewards/{SIRL_REWARD_NAME}/std"].append(trl_utils.nanstd(stats[:, 0]).item())
        metrics["reward"].append(torch.nanmean(stats[:, 1]).item())
        metrics["reward_std"].append(trl_utils.nanstd(stats[:, 1]).item())
        zero_std = torch.isclose(stats[:, 2], torch.zeros_like(stats[:, 2]))
        metrics["frac_reward_zero_std"].append(zero_std.float().mean().item())
        table_sirl, table_advantages = self._logs["rewards"][SIRL_REWARD_NAME], self._logs["advantages"]
        for row, value, advantage in zip(rows.tolist(), stats[:, 0].tolist(), stats[:, 3].tolist()):
            if 0 <= row < len(table_advantages):
                table_sirl[row], table_advantages[row] = value, advantage


def _take_rows(value, order: torch.Tensor):
    """``value`` reordered along its first dimension (TRL's batch dicts hold tensors, lists and None)."""
    if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
        return value
    if isinstance(value, torch.Tensor):
        return value[order.to(value.device)]
    return [value[i] for i in order.tolist()]
