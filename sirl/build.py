"""What a run builds before its first step: model (+ LoRA, + sharding), reference, optimizer and schedule, prompt
stream and rollout engine, seeded. ``sirl train`` calls :func:`build`; tests and benchmarks call it to get the same
objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sirl.data import PromptStream
from sirl.dist import Dist, pick_device
from sirl.optim import build_optimizer
from sirl.passes import TokenScorer
from sirl.reference import Reference
from sirl_kernels.hf import unwrap_model


@dataclass
class Built:
    policy: torch.nn.Module  # the model being trained (its parameters sharded under parallel=fsdp)
    scorer: TokenScorer  # what every pass calls: the policy's log-probs and entropies (the FSDP root unit)
    full: torch.nn.Module  # the whole policy on this rank: the policy itself, or its full copy under fsdp
    tokenizer: object
    reference: Reference | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: PromptStream
    device: torch.device
    engine: object  # the rollout engine (sirl.rollout.hf.HFEngine or sirl.rollout.vllm.VLLMEngine)
    dd: Dist

    def publish(self) -> None:
        """The policy's current weights to everything that reads them whole: the full copy (FSDP: every rank
        gathers the trainable weights; the frozen ones were copied before sharding) and the rollout engine."""
        if self.dd.sharded:
            from sirl.sharding import refresh_full_copy

            refresh_full_copy(self.policy, self.full)
        self.engine.sync_weights()


def build(cfg, dd: Dist, prompts: list) -> Built:
    """Model (+ LoRA, + sharding), tokenizer, reference, optimizer, schedule, prompt stream and rollout engine,
    all seeded."""
    from sirl.models import add_lora, load_model_and_tokenizer, resolve_dtype

    device = pick_device(cfg.device)
    # fsdp: fp32 parameters, the optimizer's master weights (its shards and moments in fp32); compute in cfg.dtype
    held = "float32" if dd.sharded else cfg.dtype
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=device, dtype=held, seed=cfg.seed)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        for adapter in model.peft_config.values():  # adapter_config.json names the model as the user gave it,
            adapter.base_model_name_or_path = cfg.model  # not the path it was loaded from (e.g. inside the venv)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            model.enable_input_require_grads()
    if cfg.compile:
        unwrap_model(model).get_decoder().compile()
    if dd.sharded:
        from sirl.sharding import full_copy, shard

        # before sharding: sampling, evaluation and export read the whole model here, in the compute dtype
        full = full_copy(model).to(resolve_dtype(cfg.dtype, device))

        def wrap(m):
            return shard(m, device, cfg.bf16)
    else:
        full, wrap = model, TokenScorer
    reference = Reference(model, wrap if dd.sharded else None) if cfg.kl_beta != 0.0 else None
    scorer = wrap(model)
    optimizer, scheduler = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    stream = PromptStream(prompts, cfg.seed, cfg.shuffle)
    engine = make_engine(cfg, full, tokenizer, device, dd)
    return Built(model, scorer, full, tokenizer, reference, optimizer, scheduler, stream, device, engine, dd)


def engine_name(cfg, device: torch.device) -> str:
    """``rollout_engine`` with ``auto`` resolved: vllm on CUDA when it is installed, hf otherwise."""
    if cfg.rollout_engine != "auto":
        return cfg.rollout_engine
    import importlib.util

    return "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") is not None else "hf"


def make_engine(cfg, policy, tokenizer, device: torch.device, dd: Dist):
    if engine_name(cfg, device) == "vllm":
        from sirl.rollout.vllm import VLLMEngine

        return VLLMEngine(policy, tokenizer, cfg, device, dd)
    from sirl.rollout.hf import HFEngine

    return HFEngine(policy, tokenizer, cfg)
