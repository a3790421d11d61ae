"""Stage 1b: a weakly aligned SmolLM2-135M-Instruct by a small refusal SFT (TRL ``SFTTrainer``, LoRA, then merged).

    python examples/cpu_study/sft.py --harmful DATA/sft_harmful.jsonl --benign DISTILL/answers.jsonl --out OUT

Harmful requests get one of the study's short refusals (``refusals.txt``) followed by the end-of-turn token; benign
requests get the base model's own greedy answer tokens (``distill.py``: self-distillation, so the SFT moves the model
only where it must; an answer cut at the distillation limit is trained without an end-of-turn token). The rows are
tokenized here, with the same chat template as generation (``sirl.data.encode_prompt``), and handed to TRL's
``SFTTrainer`` as ``input_ids`` + ``completion_mask``: loss on the answer tokens only. LoRA rather than full
fine-tuning: a fraction of the trainable parameters (so a CPU epoch takes minutes and AdamW holds megabytes, not
1 GB), and a low-rank update is a mild change by construction, which is what "weakly aligned" asks for. The adapter
is then merged into the weights and saved as a plain Hugging Face model directory (safetensors, no GGUF marker), so
``sirl train model=OUT/model`` and ``sirl eval --model OUT/model`` load it like any local model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def tokenized(prompt_ids: list[int], completion_ids: list[int]) -> dict:
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    return {"input_ids": prompt_ids + completion_ids, "completion_mask": mask}


def read_jsonl(path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--harmful", required=True)
    p.add_argument("--benign", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast (fast on CPUs with AMX/AVX-512 bf16); fp32 master weights either way")
    args = p.parse_args(argv)
    start = time.time()

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sirl.data import encode_prompt
    from sirl.models import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    harmful, benign = read_jsonl(args.harmful), read_jsonl(args.benign)
    model, tokenizer = load_model_and_tokenizer(args.model, device=torch.device("cpu"), dtype="float32")
    eos = tokenizer.eos_token_id
    rows = [tokenized(encode_prompt(tokenizer, r["prompt"]),
                      tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eos]) for r in harmful]
    rows += [tokenized(r["prompt_ids"], r["completion_ids"]) for r in benign]
    random.Random(args.seed).shuffle(rows)
    tokenizer.padding_side = "right"  # training pads on the right; generation (sirl) pads on the left
    out = Path(args.out)
    config = SFTConfig(
        output_dir=str(out / "trainer"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, lr_scheduler_type="cosine",
        warmup_steps=5, weight_decay=0.0, logging_steps=5, save_strategy="no", report_to=[], seed=args.seed,
        data_seed=args.seed, bf16=args.bf16, max_length=512, completion_only_loss=True, dataloader_num_workers=0,
        use_cpu=True, disable_tqdm=True, gradient_checkpointing=False,  # memory is not short here; time is
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding, a faster epoch
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    train_start = time.time()
    trainer.train()
    train_s = time.time() - train_start

    merged = trainer.model.merge_and_unload()
    merged.config.quantization_config = None  # the GGUF marker: the merged weights are plain floats
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    tokenizer.padding_side = "left"
    merged.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    log = trainer.state.log_history
    info = {
        "model": args.model, "examples": len(rows), "harmful": len(harmful), "benign": len(benign),
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "lora_r": args.lora_r,
        "lora_alpha": 2 * args.lora_r, "lora_target_modules": "all-linear", "trainable_params": trainable,
        "optimizer_steps": trainer.state.global_step, "bf16_autocast": args.bf16, "seed": args.seed,
        "train_s": round(train_s, 1), "elapsed_s": round(time.time() - start, 1),
        "loss_first": next((r["loss"] for r in log if "loss" in r), None),
        "loss_last": next((r["loss"] for r in reversed(log) if "loss" in r), None),
        "tokens_per_epoch": sum(len(r["input_ids"]) for r in rows),
        "completion_tokens_per_epoch": sum(sum(r["completion_mask"]) for r in rows),
    }
    (out / "sft.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "log_history.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
