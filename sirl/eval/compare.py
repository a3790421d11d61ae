"""Before/after: every numeric metric of two ``summary.json`` files side by side, with the difference B - A.

Nested metrics are flattened with dots (``per_attack.base64.dsr``); a metric present in only one run shows
``n/a`` on the other side. Above the metrics, a table of what was evaluated (model, adapter, data, judge, attacks,
subset, generation settings) for both runs; when the two differ in anything but the model being compared (model,
adapter, training step), a warning line names the settings, since the metrics then do not measure the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

from sirl.eval.report import markdown_table

SKIP = {"generation", "elapsed_s", "min_group", "date", "machine", "python", "seed", "limit", "step"}
# What was evaluated, and how (shown for both runs); the first group is what a before/after comparison changes.
MODEL_SETTINGS = ("model", "adapter", "step", "base_model", "perplexity_model")
DATA_SETTINGS = ("preset", "data", "harmful", "benign", "prompt_column", "category_column", "type_column", "n_prompts",
                 "limit", "shuffle", "seed", "attacks", "templates", "judge", "refusal_judge", "min_group")
NOT_SETTINGS = {"progress"}  # how the run was displayed, not what it computed


def flatten(summary: dict, prefix: str = "") -> dict:
    """Numeric leaves (bools excluded) of a nested dict, in their order, with dotted keys; None leaves kept."""
    out: dict = {}
    for key, value in summary.items():
        if not prefix and key in SKIP:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            out[name] = value
    return out


def load_summary(path: str | Path) -> dict:
    path = Path(path)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected an evaluation output directory)")
    return json.loads(path.read_text())


def compare(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """Rows ``(metric, A, B, B - A)`` over the union of both runs' metrics (A's order first); a key that is a
    number in neither run (e.g. a setting that is null in both) is not a metric and is left out."""
    fa, fb = flatten(a), flatten(b)
    keys = [k for k in list(fa) + [k for k in fb if k not in fa] if fa.get(k) is not None or fb.get(k) is not None]
    rows = []
    for k in keys:
        va, vb = fa.get(k), fb.get(k)
        rows.append((k, va, vb, vb - va if va is not None and vb is not None else None))
    return rows


def settings(summary: dict) -> dict:
    """The settings of a run: the model and data fields, and every generation setting (``generation.*``)."""
    out = {k: summary.get(k) for k in MODEL_SETTINGS + DATA_SETTINGS if k in summary}
    out.update({f"generation.{k}": v for k, v in (summary.get("generation") or {}).items() if k not in NOT_SETTINGS})
    return out


def setting_rows(a: dict, b: dict) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Rows ``(setting, A, B, "same"|"differs")`` and the differing settings a comparison should not have."""
    sa, sb = settings(a), settings(b)
    keys = list(sa) + [k for k in sb if k not in sa]
    shown = lambda v: "n/a" if v is None else v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    rows, suspicious = [], []
    for k in keys:
        same = sa.get(k) == sb.get(k)
        rows.append((k, shown(sa.get(k)), shown(sb.get(k)), "same" if same else "differs"))
        if not same and k not in MODEL_SETTINGS:
            suspicious.append(k)
    return rows, suspicious


def compare_dirs(dir_a: str | Path, dir_b: str | Path, output: str | Path | None = None) -> str:
    a, b = load_summary(dir_a), load_summary(dir_b)
    for field in ("command",):
        if a.get(field) != b.get(field):
            raise ValueError(f"{dir_a} is a {a.get(field)!r} run and {dir_b} a {b.get(field)!r} run: nothing to compare")
    rows = compare(a, b)
    if not rows:
        raise ValueError("the two summaries share no numeric metric")
    names = [f"A: {Path(dir_a).name}", f"B: {Path(dir_b).name}"]
    setting_table, differing = setting_rows(a, b)
    parts = [markdown_table(["setting", *names, ""], setting_table)] if setting_table else []
    if differing:
        parts.append(f"warning: the runs differ in {', '.join(differing)}: the metrics below do not measure the same "
                     "thing")
    parts.append(markdown_table(["metric", *names, "B - A"], rows))
    table = "\n\n".join(parts)
    if output is not None:
        Path(output).write_text(table + "\n")
    return table
