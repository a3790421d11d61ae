"""What a run will need before it runs: the memory of one rank, and the work of one step (``sirl train`` prints the
plan at start; ``sirl train --dry-run`` prints it and stops, having built the model on the ``meta`` device only).

Memory per rank, in bytes, for P parameters of which T are trained, W ranks:

- parameters: P x their dtype's size (``parallel=fsdp``: fp32 shards, P x 4 / W);
- gradients: T x the parameters' size (fsdp: fp32, / W);
- optimizer: AdamW's two moments, T x 2 x the parameters' size (fsdp: fp32, / W);
- full copy (fsdp only): P x the compute dtype's size, the whole model that sampling and evaluation read;
- reference: a frozen copy under full fine-tuning with kl_beta > 0 (fsdp: sharded); nothing with LoRA;
- rollout KV cache: vllm: the share ``vllm_gpu_memory_utilization`` of the device (weights included); hf: keys and
  values of every layer for every sampled sequence of this rank at full length;
- activations of one micro-batch (``micro_batch_tokens``) in training: about 34 x hidden bytes per token and layer
  in 16-bit without gradient checkpointing (Korthikanti et al. 2022, attention scores never stored: SDPA/flash),
  2 x hidden per token and layer with it, plus the fused head's workspace (sirl_kernels' chunk).

These are estimates to plan with (allocator overheads, fragmentation and temporary buffers come on top), not a
measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GIB = 2**30
# The fused head's vocabulary-wide workspace: sirl_kernels bounds one chunk at 256 MiB (fp32 logits, the chunked
# backends) or 1 GiB (the Triton backward's logits gradient); the larger bound.
HEAD_WORKSPACE = GIB


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Plan:
    world: int
    parallel: str
    params: int
    trainable: int
    rows: list[tuple[str, float]] = field(default_factory=list)  # (what, bytes per rank)
    work: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    def describe(self) -> str:
        lines = [f"plan: {count(self.params)} parameters ({count(self.trainable)} trained), {self.world} rank(s), "
                 f"parallel={self.parallel}; memory per rank (estimate):"]
        lines += [f"  {what:<48} {size / GIB:9.2f} GiB" for what, size in self.rows]
        lines.append(f"  {'total':<48} {self.total / GIB:9.2f} GiB")
        lines += [f"  {what}: {value}" for what, value in self.work]
        return "\n".join(lines)


def memory_plan(cfg, model, world: int) -> Plan:
    """The plan for ``model`` (built, or on the ``meta`` device) run with ``cfg`` over ``world`` ranks."""
    from sirl.models import resolve_dtype
    from sirl.reference import is_peft_model
    from sirl_kernels.hf import unwrap_model

    config = unwrap_model(model).config
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # device=auto plans for this machine in a run; a dry run (cfg.planning) plans for the GPU node it is meant for
    auto = "cuda" if torch.cuda.is_available() or getattr(cfg, "planning", False) else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    compute = resolve_dtype(cfg.dtype, device)
    sharded = cfg.parallel == "fsdp" and world > 1
    held = 4 if sharded else dtype_bytes(compute)  # fsdp keeps fp32 shards as the optimizer's master weights
    split = world if sharded else 1
    plan = Plan(world, cfg.parallel, params, trainable)
    plan.rows.append(("parameters" + (" (fp32 shards)" if sharded else ""), params * held / split))
    plan.rows.append(("gradients", trainable * held / split))
    plan.rows.append(("optimizer (AdamW moments)", 2 * trainable * held / split))
    if sharded:
        plan.rows.append(("full copy (sampling, evaluation)", params * dtype_bytes(compute)))
    if cfg.kl_beta and not is_peft_model(model):
        plan.rows.append(("reference (frozen copy)", params * dtype_bytes(compute) / split))
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    sequences = cfg.prompts_per_step // max(1, world) * cfg.group_size
    length = cfg.max_prompt_tokens + cfg.max_new_tokens
    engine = cfg.rollout_engine if cfg.rollout_engine != "auto" else ("vllm" if device.type == "cuda" else "hf")
    if engine == "vllm" and device.type == "cuda":
        known = torch.cuda.is_available()
        total = torch.cuda.get_device_properties(0).total_memory if known else 80 * GIB
        plan.rows.append((f"vLLM engine ({cfg.vllm_gpu_memory_utilization:g} of {'the' if known else 'an 80 GiB'} "
                          "GPU)", cfg.vllm_gpu_memory_utilization * total))
    else:
        kv = 2 * layers * kv_heads * head_dim * length * sequences * dtype_bytes(compute)
        plan.rows.append((f"rollout KV cache ({engine}, {sequences} sequences)", kv))
        if engine == "vllm":
            plan.rows.append(("vLLM engine weights (its own copy)", params * dtype_bytes(compute)))
    per_token_layer = (2 if cfg.gradient_checkpointing else 34) * hidden
    activations = cfg.micro_batch_tokens * layers * per_token_layer
    plan.rows.append((f"activations ({cfg.micro_batch_tokens} tokens/micro-batch) + head", activations + HEAD_WORKSPACE))
    tokens = cfg.prompts_per_step * cfg.group_size * length
    plan.work = [
        ("one step", f"{cfg.prompts_per_step} prompts x G={cfg.group_size} = {cfg.prompts_per_step * cfg.group_size} "
                     f"sequences of <= {cfg.max_prompt_tokens} + {cfg.max_new_tokens} tokens (<= {tokens:,} tokens, "
                     f"<= {cfg.prompts_per_step * cfg.group_size * cfg.max_new_tokens:,} generated)"),
        ("micro-batches per rank", f"<= {-(-sequences * length // cfg.micro_batch_tokens)} of {cfg.micro_batch_tokens} "
                                   f"tokens, x {cfg.updates_per_batch} update(s)"),
        ("steps", f"{cfg.steps}, evaluation every {cfg.eval_every or 'never'}"),
    ]
    return plan


def model_config(cfg):
    """The transformers config of ``cfg.model`` without its weights: ``model_config`` when set, else the model's
    own (a local directory, the shipped GGUF's header, the in-process tiny model, or the Hugging Face cache)."""
    from transformers import AutoConfig

    from sirl.models import SMOLLM2_NAMES, TINY_NAME, smollm2_gguf_path, tiny_random_llama, tiny_tokenizer
    from sirl.presets import resolve_prompt_path

    if cfg.model_config is not None:
        return AutoConfig.from_pretrained(str(resolve_prompt_path(cfg.model_config)))
    if cfg.model == TINY_NAME:
        return tiny_random_llama(tiny_tokenizer()).config
    if cfg.model.lower() in SMOLLM2_NAMES:
        path = smollm2_gguf_path()
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    try:
        return AutoConfig.from_pretrained(cfg.model)
    except OSError as exc:
        raise FileNotFoundError(f"model={cfg.model}: its config is neither a local directory nor in the Hugging Face "
                                "cache; give it with model_config=CONFIG.json") from exc


def dry_run(cfg, world: int) -> Plan:
    """Everything the run would build, on the ``meta`` device (the model from its real config, LoRA included):
    the config checked, the plan and the memory per rank, no weights loaded and nothing written."""
    from transformers import AutoModelForCausalLM

    from sirl.data import load_prompts
    from sirl.eval.suite import check_keep_best, load_suite
    from sirl.models import add_lora

    cfg.planning = True
    cfg.validate()
    load_prompts(cfg.prompts, cfg.prompt_column, cfg.dataset_split)
    check_keep_best(cfg, load_suite(cfg))
    config = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.parallel == "fsdp":
        from sirl.sharding import decoder_layers

        decoder_layers(model)  # the units FSDP would shard (fails here for a model without .layers)
    plan = memory_plan(cfg, model, world)
    plan.work.insert(0, ("model", f"{type(model).__name__} from {cfg.model_config or cfg.model}: hidden "
                                  f"{config.hidden_size}, {config.num_hidden_layers} layers, vocabulary "
                                  f"{config.vocab_size}"))
    return plan
