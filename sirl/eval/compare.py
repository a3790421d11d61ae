"""Before/after: every numeric metric of two ``summary.json`` files side by side, with the difference B - A.

Nested metrics are flattened with dots (``per_attack.base64.dsr``); settings and other non-metric fields (the
generation settings, elapsed time, strings) are left out. A metric present in only one run shows ``n/a`` on the
other side.
"""

from __future__ import annotations

import json
from pathlib import Path

from sirl.eval.report import markdown_table

SKIP = {"generation", "elapsed_s", "min_group", "date", "machine", "python", "seed", "limit"}


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
    """Rows ``(metric, A, B, B - A)`` over the union of both runs' metrics (A's order first)."""
    fa, fb = flatten(a), flatten(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    rows = []
    for k in keys:
        va, vb = fa.get(k), fb.get(k)
        rows.append((k, va, vb, vb - va if va is not None and vb is not None else None))
    return rows


def compare_dirs(dir_a: str | Path, dir_b: str | Path, output: str | Path | None = None) -> str:
    a, b = load_summary(dir_a), load_summary(dir_b)
    for field in ("command",):
        if a.get(field) != b.get(field):
            raise ValueError(f"{dir_a} is a {a.get(field)!r} run and {dir_b} a {b.get(field)!r} run: nothing to compare")
    rows = compare(a, b)
    if not rows:
        raise ValueError("the two summaries share no numeric metric")
    table = markdown_table(["metric", f"A: {Path(dir_a).name}", f"B: {Path(dir_b).name}", "B - A"], rows)
    if output is not None:
        Path(output).write_text(table + "\n")
    return table
