"""``sirl`` command line: ``sirl train ...`` and ``sirl plot OUTPUT_DIR``.

Subcommands register in ``SUBCOMMANDS`` (name -> (add_arguments, run)); ``sirl eval`` and ``sirl analyze`` plug in
the same way. Heavy imports happen inside the ``run`` functions so ``sirl --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config keys (see sirl/config.py)")
    p.add_argument("--preset", help="a preset in sirl/presets, e.g. cpu-demo")
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides the config)")
    p.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and completions.jsonl go")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. lr=1e-5 lora_r=8")


def run_train(args: argparse.Namespace) -> int:
    from sirl.config import load_config
    from sirl.train import train

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    cfg = load_config(args.config, args.preset, overrides)
    rows = train(cfg, resume=args.resume)
    if rows:
        first, last = rows[0], rows[-1]
        print(f"steps {first['step']}..{last['step']}: reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}, "
              f"entropy {first['entropy_mean']:.4f} -> {last['entropy_mean']:.4f}; metrics in "
              f"{Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


PLOTTED = ("reward_mean", "entropy_mean", "kl", "loss", "clip_frac", "grad_norm", "response_len_mean",
           "truncated_frac", "repetition", "lr")


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a training output directory holding metrics.jsonl")


def plot(output_dir: str | Path) -> list[Path]:
    """PNG curves from metrics.jsonl: one grid of all metrics (curves.png) and the reward alone (reward.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    rows = [json.loads(ln) for ln in (output_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{output_dir / 'metrics.jsonl'} has no rows")
    steps = [r["step"] for r in rows]
    keys = [k for k in PLOTTED if k in rows[0]]
    cols = 3
    fig, axes = plt.subplots((len(keys) + cols - 1) // cols, cols, figsize=(4 * cols, 2.6 * ((len(keys) + 2) // 3)))
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [r[key] for r in rows], marker="." if len(rows) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    written = [output_dir / "curves.png", output_dir / "reward.png"]
    fig.savefig(written[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, [r["reward_mean"] for r in rows], marker="o" if len(rows) < 50 else None)
    ax.set(xlabel="step", ylabel="SIRL reward (- mean entropy)", title="reward")
    fig.tight_layout()
    fig.savefig(written[1], dpi=100)
    plt.close(fig)
    return written


def run_plot(args: argparse.Namespace) -> int:
    for path in plot(args.output_dir):
        print(path)
    return 0


from sirl.eval.cli import add_analyze_arguments, add_eval_arguments, run_group  # noqa: E402 (argparse only)

SUBCOMMANDS = {
    "train": ("train a model with SIRL (GRPO on minus the policy's own entropy)", add_train_arguments, run_train),
    "plot": ("write PNG curves of OUTPUT_DIR/metrics.jsonl", add_plot_arguments, run_plot),
    "eval": ("evaluate a model: dsr | overrefusal | capability | compare", add_eval_arguments, run_group),
    "analyze": ("analyses of a model: entropy-gap", add_analyze_arguments, run_group),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sirl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
