"""The SIRL loop. One step, top to bottom:

    prompts -> rollout (G samples each) -> score (entropy -> reward = -mean entropy -> group z-score advantage)
            -> reference log-probs -> loss (clipped surrogate + beta KL, micro-batched) -> optimizer step
            -> weights to the rollout engine -> evaluation (every eval_every steps) -> metrics line, checkpoint

Each stage lives in its own module: ``rollout/`` (the engines), ``scoring.py`` (rewards and advantages from one
``RewardSpec``), ``reference.py``, ``passes.py`` (the no-grad and loss passes), ``loss.py``, ``optim.py``,
``metrics.py``, ``checkpoint.py``, ``dist.py``, ``eval/``; this file is the order they run in.

On-policy (one update per rollout, the default) the score comes from the loss pass itself: each micro-batch holds
whole groups, its forward's entropies give the rewards and advantages before its loss is formed, and its detached
log-probs are the old ones, so no separate no-grad scoring pass runs (``reward_pass``; TRL's SIRLGRPOTrainer does
the same). Off-policy (``updates_per_batch > 1``), with a batch-wide advantage std, or with dropout active in the
model (the loss pass runs in train mode), a no-grad pass scores first.

Data parallel (``torchrun``): every rank builds the same prompt stream and takes a contiguous slice of each
step's prompts, so groups never span ranks. Gradients are summed across ranks by hand after the backward passes:
the loss goes through ``sirl_kernels.hf`` (decoder body + fused head), not through ``module.forward``, which is
what ``DistributedDataParallel``'s reducer hooks onto; the loss is already normalised by the global token count,
so a plain all-reduce sum gives exactly the single-process gradient (tested).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from sirl.build import build
from sirl.checkpoint import (
    choose_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    recover_dir,
    save_best,
    save_checkpoint,
    save_model,
    saved_config,
)
from sirl.config import ConfigError, SIRLConfig, check_resume_changes, reward_in_loss, save_config
from sirl.data import encode_prompt, load_prompts
from sirl.dist import Dist, init_distributed, pick_device
from sirl.eval.suite import EvalSuite, check_keep_best, evaluate, load_llm_judge, load_suite, load_suite_code
from sirl.metrics import Logger, StageTimer, check_logs, log_config_changes, peak_memory_mb, stage_split, step_metrics
from sirl.metrics import timing_metrics
from sirl.models import active_dropout
from sirl.optim import apply_optimizer_settings
from sirl.plan import memory_plan
from sirl.passes import logprob_support, policy_gradient_pass, token_statistics
from sirl.reference import reference_logprobs
from sirl.scoring import ScoreInLoss, Scoring, valid_rows
from sirl.selection import BestTracker
from sirl.sharding import full_tensor
from sirl_kernels import validate_labels
from sirl_kernels.hf import output_head, unwrap_model


def reward_from_loss_pass(cfg: SIRLConfig, policy, dd: Dist) -> bool:
    """Whether the rewards come from the training forward. The config allows it (``reward_in_loss``) only
    on-policy; the built model must also have no active dropout: the loss pass runs in train mode, so dropout would
    noise the rewards that the separate (eval-mode) scoring pass gives. Under ``auto`` that falls back to the
    separate pass; an explicit ``reward_pass=loss`` is refused."""
    if not reward_in_loss(cfg):
        return False
    dropout = active_dropout(policy)
    if dropout is None:
        return True
    if cfg.reward_pass == "loss":
        raise ConfigError(f"reward_pass=loss: not with {dropout} (the training forward is not the sampling "
                          "policy); use reward_pass=separate or auto")
    if dd.main:
        print(f"reward_pass=auto: the rewards come from a separate no-grad pass ({dropout} is active in the "
              "training forward)", flush=True)
    return False


def rank0_choice(dd: Dist, choose, output_dir: Path):
    """Rank 0 chooses the checkpoint to resume (verifying checksums once, not once per rank) and the others take
    its choice."""
    from sirl.checkpoint import PREFIX, STATE
    from sirl.files import read_json

    choice = dd.run_on_main(choose)
    step = int(dd.all_sum([float(choice[1]["step"]) if dd.main else 0.0])[0])
    if dd.main:
        return choice
    path = output_dir / f"{PREFIX}{step:07d}"
    return path, read_json(path / STATE)


def row_keys(seed: int, step: int, rank: int, rows: int) -> list[tuple]:
    """One key per row of this rank's rollout, the same whatever the number of ranks (a row's place in the
    step's whole batch): what the ``random`` reward draws from."""
    return [(seed, step, rank * rows + i) for i in range(rows)]


def evaluation(step: int, policy, tokenizer, suite: EvalSuite, output_dir: Path, timer: StageTimer, dd: Dist,
               selection: BestTracker, bar=None) -> dict:
    """The evaluation at ``step``: rank 0 evaluates (the others wait) and saves the model when it is the best so
    far; returns the ``eval/*`` metrics (empty on other ranks). The caller shares the early-stop decision."""
    if bar is not None:
        bar.set_description(f"sirl (evaluating step {step})")
    metrics = {}
    with timer("eval"):
        if dd.main:
            metrics = evaluate(policy, tokenizer, suite, step=step, output_dir=output_dir)
        dd.barrier()
    if bar is not None:
        bar.set_description("sirl")
    if dd.main and selection.update(step, metrics):
        save_best(output_dir, policy, tokenizer, selection)
    return metrics


def restore_best(output_dir: Path, policy, tokenizer, selection: BestTracker, step: int) -> None:
    """``best/`` after a crash: restored from an interrupted save's copies, else rebuilt when the best step is
    the checkpoint just loaded; otherwise it will be written again at the next new best (warned)."""
    if selection.best_step is None or recover_dir(output_dir / "best"):
        return
    if selection.best_step == step:
        print(f"rebuilding {output_dir / 'best'} (step {step}) from its checkpoint", flush=True)
        save_best(output_dir, policy, tokenizer, selection)
    else:
        warnings.warn(f"{output_dir / 'best'} is missing and step {selection.best_step}'s weights are in no "
                      "checkpoint: it is written again at the next new best", stacklevel=2)


def finish(output_dir: Path, policy, tokenizer, cfg: SIRLConfig, start: int, last: int) -> None:
    """``final/`` of a complete run: written after its last step, or rebuilt from the checkpoint a resumed
    complete run loaded when a crash lost it."""
    if last > start:
        save_model(policy, tokenizer, output_dir / "final")
    elif not recover_dir(output_dir / "final"):
        print(f"the run is complete at step {start}; rebuilding {output_dir / 'final'} from its checkpoint",
              flush=True)
        save_model(policy, tokenizer, output_dir / "final")
    elif start == cfg.steps:
        print(f"nothing to do: the run is complete at step {start} and {output_dir / 'final'} is intact", flush=True)


def train(cfg: SIRLConfig, resume: bool = False, allow_config_change: bool = False, overwrite: bool = False,
          on_build=None) -> list[dict]:
    """Runs ``cfg.steps`` steps (continuing from the newest intact checkpoint when ``resume``); returns the metric
    rows. ``on_build(built)``, when given, sees what was built (``sirl.build.Built``: benchmarks).

    Everything that can be checked without a model is checked first, in this order: the config; on ``resume``,
    the checkpoint (the newest one whose manifest and ``state.json`` hold), the differences from its saved config
    (only ``MAY_CHANGE_ON_RESUME`` keys may differ unless ``allow_config_change``; then every change is logged and
    applied, the optimizer's lr included) and the run's logs; the training prompts; the evaluation sets (and that
    ``keep_best`` names a metric they give); the output directory (a fresh run refuses another run's files unless
    ``overwrite``, which moves them aside; it must be writable). Code named by ``py:`` references is imported
    last, once all of that passed."""
    cfg.validate()
    dd = init_distributed(pick_device(cfg.device), cfg.parallel)
    if cfg.prompts_per_step % dd.world:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step}: must be divisible by the {dd.world} ranks")
    output_dir = Path(cfg.output_dir)
    checkpoint, state, changes = None, None, {}
    if resume:
        checkpoint, state = rank0_choice(dd, lambda: choose_checkpoint(output_dir, cfg), output_dir)
        changes = check_resume_changes(saved_config(checkpoint), cfg, allow_config_change)
        check_logs(output_dir)
    prompts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.dataset_split)
    suite = load_suite(cfg)
    check_keep_best(cfg, suite)  # against the suite's attack names as resolved (e.g. columns -> column:NAME)
    # the first write, once all that passed; on rank 0 only (the others would race it for the same files), and the
    # others go on once it is done (run_on_main ends with a collective)
    dd.run_on_main(lambda: prepare_output_dir(output_dir, resume=resume, overwrite=overwrite))
    load_suite_code(suite, cfg)  # imports py: references: only now that everything else has passed
    # Same seed everywhere for the model and data order; per-rank offset only for sampling (set below).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run = build(cfg, dd, prompts)
    policy, tokenizer, reference, optimizer, stream, device = (run.policy, run.tokenizer, run.reference,
                                                               run.optimizer, run.stream, run.device)
    if dd.main:
        print(memory_plan(cfg, policy, dd.world).describe(), flush=True)
    if on_build is not None:
        on_build(run)
    in_loss = reward_from_loss_pass(cfg, policy, dd)  # the reward from the training forward: no separate pass
    scoring = Scoring.of(cfg)
    torch.manual_seed(cfg.seed + 1000 * dd.rank)
    if suite is not None and dd.main:  # only rank 0 evaluates
        load_llm_judge(suite, device, cfg.dtype)
    selection = BestTracker(cfg.keep_best, cfg.keep_best_mode, cfg.early_stop_patience)

    start = 0
    if resume:
        load_checkpoint(checkpoint, policy, optimizer, run.scheduler, stream, dd)
        start = state["step"]
        selection.load_state_dict(state.get("selection"))
        apply_optimizer_settings(optimizer, run.scheduler, cfg)
        run.publish()  # the full copy and the engine sample from the restored weights
        if dd.main:
            log_config_changes(output_dir, start, changes)
            restore_best(output_dir, run.full, tokenizer, selection, start)
    if dd.main:
        save_config(cfg, output_dir / "config.json")  # only now: the settings this run goes on with
    logger = Logger(output_dir, cfg.tensorboard, dd.main, start)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if cfg.bf16 and device.type == "cuda" else nullcontext())
    per_rank = cfg.prompts_per_step // dd.world
    vocab_size = output_head(unwrap_model(run.full))[0].shape[0]  # rows of lm_head: the valid token ids
    encoded = {}  # prompt index -> token ids (the chat template is applied once per prompt)

    bar = None
    if cfg.progress and dd.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="sirl", dynamic_ncols=True)

    rows = []
    if selection.should_stop:
        print(f"this run stopped early at step {start} ({selection.describe()}); raise early_stop_patience "
              "to continue it")
    elif suite is not None and start == 0:
        timer = StageTimer(device)
        row = {"step": 0, **evaluation(0, run.full, tokenizer, suite, output_dir, timer, dd, selection, bar)}
        row.update(timing_metrics(timer.seconds, {}))
        rows.append(row)
        logger.metrics(row)

    stopped = dd.rank0_flag(selection.should_stop)
    for step in range(start + 1, cfg.steps + 1):
        if stopped:
            break
        timer = StageTimer(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # 1. prompts: every rank draws the same step, keeps its own whole groups
        indices = stream.next_indices(cfg.prompts_per_step)[dd.rank * per_rank:(dd.rank + 1) * per_rank]
        for i in indices:
            if i not in encoded:
                encoded[i] = encode_prompt(tokenizer, stream.prompts[i], cfg.system_prompt, cfg.max_prompt_tokens)

        with autocast:
            # 2. rollout: G samples per prompt from the current policy
            with timer("rollout"):
                batch = run.engine.generate([encoded[i] for i in indices])
                # One token-id check per rollout (one host sync) instead of one per kernel call: every pass below
                # runs the kernels with check_labels=False, and the kernel calls don't sync. (Each forward still
                # does: trim() reads the used width, and the HF helper's boolean-mask gather of the rows that
                # predict completion tokens needs their count.)
                validate_labels(batch.input_ids, vocab_size)
            keys = row_keys(cfg.seed, step, dd.rank, len(batch))
            # 3. score: the entropies the reward is made of, the rewards, the group advantages. On-policy they come
            #    from the training forward in step 5 (no extra pass); otherwise from one no-grad forward here,
            #    whose log-probs are also the old ones for the ratio.
            scores = old_logprobs = None
            if not in_loss:
                with timer("score"):
                    stats = token_statistics(run.scorer, batch, cfg.temperature, cfg.micro_batch_tokens,
                                             check_labels=False, extra=scoring.extra_statistics,
                                             support=logprob_support(cfg), confidence_k=scoring.confidence_k)
                    old_logprobs, entropy = stats.pop("logprobs"), stats.pop("entropy")
                    scores = scoring(batch, entropy, old_logprobs, keys, dd, extra=stats)
            # 4. reference: log-probs of the KL anchor (the adapters disabled, or the frozen copy)
            with timer("reference"):
                ref_logprobs = (reference_logprobs(reference, run.scorer, batch, cfg.temperature,
                                                   cfg.micro_batch_tokens, check_labels=False,
                                                   support=logprob_support(cfg))
                                if reference is not None else None)

        with timer("update"):
            # 5. loss and update (mu passes over the same rollout; old log-probs stay those of the first pass),
            #    then the new weights to the rollout engine
            run.engine.before_update()
            loss_mask = batch.completion_mask.bool() & valid_rows(batch.truncated, cfg.truncation)[:, None]
            scorer = ScoreInLoss(scoring, batch, keys) if in_loss else None
            policy.train()
            for _ in range(cfg.updates_per_batch):
                optimizer.zero_grad(set_to_none=True)
                stats = policy_gradient_pass(run.scorer, batch, old_logprobs, ref_logprobs,
                                             None if in_loss else scores.advantages, loss_mask, cfg, dd, autocast,
                                             score_in_loss=scorer)
                grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(
                    [p for p in policy.parameters() if p.requires_grad], cfg.max_grad_norm)))
                if not math.isfinite(grad_norm):  # NaN log-probs (a NaN in the model) must not reach the weights
                    raise FloatingPointError(
                        f"step {step}: the gradient norm is {grad_norm}; NaN or inf in the model's log-probs or "
                        "loss, so no update was applied (see metrics.jsonl for the last good step)"
                    )
                lr = optimizer.param_groups[0]["lr"]  # the rate this update used
                optimizer.step()
            run.scheduler.step()
            run.publish()
            scores = scorer.scores if in_loss else scores
        step_time = time.perf_counter() - t0

        # 6. evaluation on the held-out sets (step 0 was before the loop), best model, early stop
        eval_metrics = {}
        if suite is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            eval_metrics = evaluation(step, run.full, tokenizer, suite, output_dir, timer, dd, selection, bar)
            stopped = dd.rank0_flag(selection.should_stop)

        # 7. metrics over all ranks
        completions = [row[m].tolist() for row, m in zip(batch.input_ids, batch.completion_mask.bool())]
        row = step_metrics(step, batch, scores, completions, stats, grad_norm=grad_norm, lr=lr, step_time=step_time,
                           dd=dd)
        tokens = row["tokens"]
        stage_tokens = {"rollout": row["generated_tokens"], "score": 0.0 if in_loss else tokens,
                        "reference": tokens if reference is not None else 0.0, "update": tokens * cfg.updates_per_batch}
        row.update({"peak_mem_mb": peak_memory_mb(device),  # rank 0's
                    "data_position": stream.position, **timing_metrics(timer.seconds, stage_tokens), **eval_metrics})
        rows.append(row)
        logger.metrics(row)
        if cfg.log_completions_every and step % cfg.log_completions_every == 0:
            logger.completions([
                {"step": step, "prompt": str(stream.prompts[indices[int(batch.prompt_index[j])]]),
                 "completion": tokenizer.decode(completions[j], skip_special_tokens=True),
                 "reward": scores.rewards[j].item(), "truncated": bool(batch.truncated[j])}
                for j in range(len(batch))
            ])
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"reward {row['reward_mean']:.3f} entropy {row['entropy_mean']:.3f} "
                                f"kl {row['kl']:.1e} | {stage_split(row)}")
        if stopped and dd.main:
            print(f"early stop at step {step}: {selection.describe()}", flush=True)
        if step % cfg.save_every == 0 or step == cfg.steps or stopped:
            save_checkpoint(output_dir, step, policy, optimizer, run.scheduler, stream, cfg, dd, selection)

    if bar is not None:
        bar.close()
    logger.close()
    last = rows[-1]["step"] if rows and "reward_mean" in rows[-1] else start
    if dd.main and (last == cfg.steps or stopped or selection.should_stop):
        finish(output_dir, run.full, tokenizer, cfg, start, last)
    return rows
