"""Evaluation during training: the DSR, over-refusal and capability commands of ``sirl eval`` on held-out sets.

``sirl train`` with ``eval_every=N`` evaluates the policy at step 0, every N steps and at the last step:

- DSR on ``eval_harmful`` under ``eval_attacks`` (``sirl.eval.dsr.run_dsr``, the configured judge);
- over-refusal on ``eval_overrefusal`` (``run_overrefusal``; an XSTest file contributes its ``label=safe`` rows);
- a capability probe on ``eval_capability`` (``run_capability``: base-model perplexity of the answers and,
  with ``eval_score_fn``, your score function).

Answers are greedy, each set is the same seeded subset of ``eval_limit`` prompts every time, and the evaluation
runs inside a forked RNG, so it draws nothing from the training run's random stream: a run with evaluation trains
exactly as one without (tested). Each evaluation writes the commands' usual outputs to
``OUTPUT_DIR/eval/step-NNNNNNN/{dsr,overrefusal,capability}/`` (so ``sirl eval compare`` lines up two steps) and
returns the ``eval/*`` metrics that go into ``metrics.jsonl``:

==============================  ==================================================================================
``eval/dsr``                    refused / answered, over every (attack, prompt) pair
``eval/dsr/ATTACK``             per attack, when there are several
``eval/overrefusal``            refusal rate on the safe prompts
``eval/safety``                 ``eval/dsr - eval/overrefusal`` (a model that refuses everything scores 0)
``eval/capability_perplexity``  perplexity of the probe's answers under the base model (adapter disabled)
``eval/capability_score``       mean of ``eval_score_fn`` over the probe's answers
``eval/repetition``             1 - distinct-2 of each set's answers, averaged over the sets (collapse alarm)
``eval/entropy``                mean token entropy of the answers, averaged over the sets
``eval/response_len``           mean answer length in tokens, averaged over the sets
==============================  ==================================================================================
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sirl.eval.attacks import Attack, resolve_attacks
from sirl.eval.datasets import PromptSet
from sirl.eval.report import mean


def metric_names(suite: EvalSuite) -> list[str]:
    """The ``eval/*`` keys an evaluation of ``suite`` writes (what ``keep_best`` may name), with the attack names
    as ``resolve_attacks`` gave them (``columns`` becomes ``column:NAME`` per attack column of the file)."""
    names = []
    if suite.harmful is not None:
        names.append("eval/dsr")
        if len(suite.attacks) > 1:  # as in eval_metrics: per-attack rates only when there are several
            names += [f"eval/dsr/{a.name}" for a in suite.attacks]
    if suite.overrefusal is not None:
        names.append("eval/overrefusal")
    if suite.harmful is not None and suite.overrefusal is not None:
        names.append("eval/safety")
    if suite.capability is not None:
        names.append("eval/capability_perplexity")
        if suite.score_fn_spec is not None:
            names.append("eval/capability_score")
    return names + ["eval/repetition", "eval/entropy", "eval/response_len"]


def check_keep_best(cfg, suite: EvalSuite | None) -> None:
    """ConfigError unless ``cfg.keep_best`` (when set) is a metric that evaluating ``suite`` writes."""
    if cfg.keep_best is None:
        return
    from sirl.config import ConfigError

    names = metric_names(suite) if suite is not None else []
    if cfg.keep_best not in names:
        raise ConfigError(f"keep_best={cfg.keep_best}: this configuration's evaluations give {', '.join(names)}")


@dataclass
class EvalSuite:
    """The held-out sets, read once before any model loads (a bad file, column or attack fails the run there)."""

    harmful: PromptSet | None
    attacks: list[Attack]
    overrefusal: PromptSet | None
    capability: PromptSet | None
    score_fn: Callable | None  # imported by ``load_suite_code``
    score_fn_spec: str | None  # what eval_score_fn names
    judge: Callable | None  # loaded with the model when it is an LLM judge (``load_llm_judge``)
    judge_spec: str
    gen: dict  # generation settings of sirl.eval.generate.generate
    seed: int  # every evaluation runs under this seed (in an RNG forked from the training run's)
    meta: dict = field(default_factory=dict)  # recorded in every summary.json


def load_suite(cfg) -> EvalSuite | None:
    """``cfg``'s evaluation sets (None when ``eval_every`` is 0). Keyword judges load here, ``py:`` references
    in ``load_suite_code`` (last), an ``llm:`` judge in ``load_llm_judge`` once the policy is on its device."""
    if not cfg.eval_every:
        return None
    from sirl.config import ConfigError
    from sirl.eval.overrefusal import DEFAULT_FILTERS

    def checked(key: str, build: Callable):
        """``build()``, its error reported against the config key (one line: key, value, problem)."""
        try:
            return build()
        except (ValueError, FileNotFoundError, ImportError, AttributeError) as exc:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: {exc}") from exc

    def prompt_set(key: str, **kwargs):
        return checked(key, lambda: PromptSet(getattr(cfg, key), limit=cfg.eval_limit, shuffle=cfg.eval_shuffle,
                                              seed=cfg.seed, **kwargs))

    harmful = prompt_set("eval_harmful") if cfg.eval_harmful else None
    attacks = checked("eval_attacks", lambda: resolve_attacks(cfg.eval_attacks, columns=harmful.attack_columns)
                      ) if harmful else []
    overrefusal = prompt_set("eval_overrefusal", default_filters=DEFAULT_FILTERS) if cfg.eval_overrefusal else None
    capability = prompt_set("eval_capability") if cfg.eval_capability else None
    gen = dict(max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size, do_sample=False,
               temperature=1.0, top_p=1.0, samples_per_prompt=1, system_prompt=cfg.system_prompt,
               max_prompt_tokens=cfg.max_prompt_tokens, progress=False)
    meta = dict(model=cfg.model, seed=cfg.seed, limit=cfg.eval_limit, shuffle=cfg.eval_shuffle,
                during_training=cfg.output_dir)
    suite = EvalSuite(harmful, attacks, overrefusal, capability, None, cfg.eval_score_fn, None, cfg.eval_judge, gen,
                      cfg.seed, meta)
    if cfg.eval_judge.startswith("keyword"):
        suite.judge = checked("eval_judge", lambda: _judge(cfg.eval_judge, torch.device("cpu"), cfg.dtype,
                                                           cfg.eval_batch_size))
    return suite


def load_suite_code(suite: EvalSuite | None, cfg) -> None:
    """Imports the code that ``py:`` references of ``cfg`` name (``eval_score_fn``, ``eval_judge=py:...``).
    A config that names one runs that module's code: ``sirl train`` calls this only after every other check of the
    run has passed, just before the model loads."""
    if suite is None:
        return
    from sirl.config import ConfigError
    from sirl.eval.judge import import_callable

    def imported(key: str, spec: str):
        try:
            return import_callable(spec.removeprefix("py:"))
        except (ValueError, ImportError, AttributeError) as exc:
            raise ConfigError(f"{key}={spec}: {exc}") from exc

    if cfg.eval_score_fn:
        suite.score_fn = imported("eval_score_fn", cfg.eval_score_fn)
    if cfg.eval_judge.startswith("py:"):
        suite.judge = imported("eval_judge", cfg.eval_judge)


def _judge(spec: str, device, dtype: str, batch_size: int):
    from sirl.eval.judge import load_judge

    return load_judge(spec, device=device, dtype=dtype, batch_size=batch_size)


def load_llm_judge(suite: EvalSuite, device: torch.device, dtype: str) -> None:
    """Loads an ``llm:`` judge onto ``device`` (the others were loaded by ``load_suite``)."""
    if suite.judge is None:
        suite.judge = _judge(suite.judge_spec, device, dtype, suite.gen["batch_size"])


@contextmanager
def forked_rng(seed: int, device: torch.device):
    """Runs the block seeded with ``seed`` and restores every RNG afterwards (the training stream is untouched)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def evaluate(model, tokenizer, suite: EvalSuite, *, step: int, output_dir: str | Path) -> dict:
    """Runs every set of ``suite`` on ``model``; writes their outputs under ``OUTPUT_DIR/eval/step-N/``; returns
    the ``eval/*`` metrics."""
    from sirl.eval.capability import run_capability
    from sirl.eval.dsr import run_dsr
    from sirl.eval.overrefusal import run_overrefusal

    out = Path(output_dir) / "eval" / f"step-{step:07d}"
    meta = {**suite.meta, "adapter": f"training step {step}", "step": step}
    common = dict(gen=suite.gen, meta=meta, plot=False, echo=False)
    summaries = {}
    device = next(model.parameters()).device
    with forked_rng(suite.seed, device):
        if suite.harmful is not None:
            summaries["dsr"] = run_dsr(model, tokenizer, suite.harmful, suite.attacks, suite.judge,
                                       output_dir=out / "dsr", **common)
        if suite.overrefusal is not None:
            summaries["overrefusal"] = run_overrefusal(model, tokenizer, suite.overrefusal, suite.judge,
                                                       output_dir=out / "overrefusal", **common)
        if suite.capability is not None:
            summaries["capability"] = run_capability(model, tokenizer, suite.capability, score_fn=suite.score_fn,
                                                     judge=suite.judge, output_dir=out / "capability", **common)
    return eval_metrics(summaries)


def eval_metrics(summaries: dict) -> dict:
    """``{"dsr": summary, "overrefusal": summary, "capability": summary}`` (any subset) -> ``eval/*`` metrics."""
    out = {}
    dsr, over, cap = summaries.get("dsr"), summaries.get("overrefusal"), summaries.get("capability")
    if dsr is not None:
        out["eval/dsr"] = dsr["dsr"]
        if len(dsr["per_attack"]) > 1:
            out.update({f"eval/dsr/{name}": v["dsr"] for name, v in dsr["per_attack"].items()})
    if over is not None:
        out["eval/overrefusal"] = over["refusal_rate"]
    if dsr is not None and over is not None:
        out["eval/safety"] = dsr["dsr"] - over["refusal_rate"]
    if cap is not None:
        out["eval/capability_perplexity"] = cap["perplexity"]
        if "judge_score_mean" in cap:
            out["eval/capability_score"] = cap["judge_score_mean"]
    sets = [s for s in (dsr, over, cap) if s is not None]
    out["eval/repetition"] = mean(s.get("repetition") for s in sets)
    out["eval/entropy"] = mean(s.get("entropy_mean") for s in sets)
    out["eval/response_len"] = mean(s.get("response_tokens_mean") for s in sets)
    return out
