"""``sirl`` command line: ``sirl train ...`` and ``sirl plot OUTPUT_DIR``.

Subcommands register in ``SUBCOMMANDS`` (name -> (add_arguments, run)); ``sirl eval`` and ``sirl analyze`` plug in
the same way. Heavy imports happen inside the ``run`` functions so ``sirl --help`` stays instant. A failing command
prints one line (``sirl train: error: lr=-1: must be a number > 0``); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def preset_lines() -> list[str]:
    """``name: first comment line`` of every preset in sirl/presets."""
    from sirl.config import preset_path, preset_names

    lines = []
    for name in preset_names():
        first = preset_path(name).read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"  {name}: {first}")
    return lines


def train_epilog() -> str:
    from sirl.config import MAY_CHANGE_ON_RESUME, describe_keys

    return "\n".join([
        "presets (--preset NAME):", *preset_lines(), "",
        "config keys (key=value on the command line, or in a --config YAML file; booleans: true/false, 1/0, "
        "yes/no; null for none):", describe_keys(), "",
        f"--resume may change only {', '.join(MAY_CHANGE_ON_RESUME)}; anything else needs --allow-config-change.",
        "",
        "trust: a config and a run directory are data, except that eval_judge=py:MODULE:FN and eval_score_fn "
        "import that module and run its code (after every other check); checkpoints are read as safetensors, JSON "
        "and weights_only torch files, never as pickled objects.",
    ])


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = train_epilog()
    p.add_argument("--config", help="YAML file of config keys (listed below)")
    p.add_argument("--preset", help="a preset in sirl/presets (listed below), e.g. cpu-demo")
    p.add_argument("--steps", help="total optimizer steps (the same as steps=N)")
    p.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and completions.jsonl go")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --output-dir that holds another run: its files are moved into "
                        "OUTPUT_DIR/previous-<time>/, never deleted")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, build the model on the meta device from its config (model_config, or the "
                        "model's own) and print the plan and the memory per rank; load no weights, write nothing")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: plan for this many ranks (default: $WORLD_SIZE, else 1)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: apply settings that differ from the run's saved config (logged in "
                        "config_changes.jsonl) instead of refusing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. lr=1e-5 lora_r=8")


def run_train(args: argparse.Namespace) -> int:
    from sirl.config import ConfigError, load_config, merge_flags, parse_overrides
    from sirl.train import train

    overrides = merge_flags(parse_overrides(args.overrides), {"steps": args.steps, "output_dir": args.output_dir})
    if args.allow_config_change and not args.resume:
        raise ConfigError("--allow-config-change only applies with --resume")
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite starts the run again and --resume continues it: give one of them")
    cfg = load_config(args.config, args.preset, overrides, planning=args.dry_run)
    if args.dry_run:
        import os

        from sirl.plan import dry_run

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        if world < 1:
            raise ConfigError(f"--world-size {world}: must be >= 1")
        print(dry_run(cfg, world).describe())
        return 0
    if args.world_size is not None:
        raise ConfigError("--world-size only applies with --dry-run (torchrun sets the ranks of a real run)")
    rows = [r for r in train(cfg, resume=args.resume, allow_config_change=args.allow_config_change,
                             overwrite=args.overwrite) if "reward_mean" in r]
    if rows:
        first, last = rows[0], rows[-1]
        print(f"steps {first['step']}..{last['step']}: reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}, "
              f"entropy {first['entropy_mean']:.4f} -> {last['entropy_mean']:.4f}; metrics in "
              f"{Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


PLOTTED = ("reward_mean", "entropy_mean", "kl", "loss", "clip_frac", "grad_norm", "response_len_mean",
           "truncated_frac", "repetition", "lr")


def stage_keys() -> tuple[str, ...]:
    """The ``time/STAGE_s`` keys of one training step's stages (the evaluation's are ``time/eval_s``)."""
    from sirl.metrics import STEP_STAGES  # imported here, not at the top: ``sirl --help`` stays instant

    return tuple(f"time/{stage}_s" for stage in STEP_STAGES)


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a training output directory holding metrics.jsonl")
    p.add_argument("--keys", nargs="+", metavar="KEY", help="only these metrics, in this order, into one PNG "
                   "(--out); 'stages' adds the seconds per stage")
    p.add_argument("--out", help="with --keys: the PNG to write (default OUTPUT_DIR/selected.png)")


def curve(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that have ``key`` (evaluation keys are only in evaluation rows)."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_grid(path: Path, rows: list[dict], keys: list[str], stages: bool = False) -> Path:
    """One panel per key (+ one of the seconds per stage when ``stages``), 3 per line."""
    import matplotlib.pyplot as plt

    panels = len(keys) + int(stages)
    cols = 3
    lines = (panels + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 2.6 * lines), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = curve(rows, key)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    if stages:  # the stages of the training steps (an evaluation's seconds are time/eval_s, in the eval rows)
        ax = axes.flat[len(keys)]
        for key in stage_keys():
            steps, values = curve([r for r in rows if "reward_mean" in r], key)
            if any(values):
                ax.plot(steps, values, label=key[5:-2], marker="." if len(steps) < 50 else None)
        ax.set(title="seconds per stage of a step", xlabel="step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(output_dir: str | Path, keys: list[str] | None = None, out: str | Path | None = None) -> list[Path]:
    """PNG curves from metrics.jsonl: every metric (curves.png), the reward alone (reward.png) and, when the run
    evaluated, the eval/* metrics and their seconds (eval.png); with ``keys``, only those into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sirl.metrics import read_metrics

    output_dir = Path(output_dir)
    rows = read_metrics(output_dir)
    train_rows = [r for r in rows if "reward_mean" in r]
    if not train_rows:
        raise ValueError(f"{output_dir / 'metrics.jsonl'} has no training rows")
    if keys:
        missing = [k for k in keys if k != "stages" and not any(k in r for r in rows)]
        if missing:
            known = sorted({k for r in rows for k in r})
            raise ValueError(f"--keys {', '.join(missing)}: not in metrics.jsonl (it has {', '.join(known)})")
        chosen = [k for k in keys if k != "stages"]
        return [plot_grid(Path(out) if out else output_dir / "selected.png", rows, chosen, "stages" in keys)]
    keys = [k for k in PLOTTED if k in train_rows[0]]
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    stages = any(k in train_rows[0] for k in stage_keys())
    written = [plot_grid(output_dir / "curves.png", rows, keys + eval_keys, stages)]

    steps, rewards = curve(train_rows, "reward_mean")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, rewards, marker="o" if len(steps) < 50 else None)
    ax.set(xlabel="step", ylabel="SIRL reward (- mean entropy)", title="reward")
    fig.tight_layout()
    fig.savefig(output_dir / "reward.png", dpi=100)
    plt.close(fig)
    written.append(output_dir / "reward.png")
    if eval_keys:
        written.append(plot_grid(output_dir / "eval.png", rows, eval_keys + ["time/eval_s"]))
    return written


def run_plot(args: argparse.Namespace) -> int:
    for path in plot(args.output_dir, args.keys, args.out):
        print(path)
    return 0


from sirl.eval.cli import add_analyze_arguments, add_debug_flag, add_eval_arguments, run_group  # noqa: E402

SUBCOMMANDS = {
    "train": ("train a model with SIRL (GRPO on minus the policy's own entropy)", add_train_arguments, run_train),
    "plot": ("write PNG curves of OUTPUT_DIR/metrics.jsonl", add_plot_arguments, run_plot),
    "eval": ("evaluate a model: dsr | overrefusal | capability | compare", add_eval_arguments, run_group),
    "analyze": ("analyses of a model: entropy-gap", add_analyze_arguments, run_group),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sirl", description=__doc__.splitlines()[0])
    add_debug_flag(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        add_debug_flag(p)
        p.set_defaults(run=run)
    return parser


def one_line(exc: BaseException) -> str:
    """An error as one line: the message's lines joined (plus the exception type, unless it is a ConfigError)."""
    from sirl.config import ConfigError

    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or repr(exc)
    return text if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Runs a command; an error prints one line to stderr and returns 2 (``--debug``: the traceback instead)."""
    import warnings

    with warnings.catch_warnings():  # restores the caller's warning display when the command returns
        # A warning is one line, like an error: what happened and the file it concerns, not the source line.
        warnings.showwarning = lambda message, *_args, **_kwargs: print(f"warning: {message}", file=sys.stderr)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere, also after an option (argparse stops a positional list there)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except BrokenPipeError:  # the output went to a pager or `head` that closed early: not an error of the command
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure of a command is reported the same way
        if args.debug:
            raise
        name = " ".join(x for x in (args.command, getattr(args, "subcommand", None)) if x)
        print(f"sirl {name}: error: {one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
