"""What every evaluation command writes: a printed markdown table, ``summary.json``, ``responses.jsonl``, PNGs."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Sequence


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.2e}" if 0 < abs(value) < 0.5 * 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(str(x).ljust(w) for x, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def rate_table(groups: dict, label: str, rate_key: str) -> str:
    """``{name: {"n", rate_key, ...}}`` -> a table of name, n, rate."""
    return markdown_table([label, "n", rate_key], [[k, v["n"], v[rate_key]] for k, v in groups.items()])


def machine() -> str:
    """CPU model and core count (and the GPU when CUDA is in use), for the record of a run."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    out = f"{cpu}, {os.cpu_count()} cores"
    import torch

    return out + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def run_info(**extra) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "python": platform.python_version(),
            **extra}


def write_outputs(output_dir: str | Path, summary: dict, records: list[dict] | None = None, table: str = "") -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if records is not None:
        with open(out / "responses.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if table:
        (out / "table.md").write_text(table + "\n")
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: str | Path, panels: list[tuple[str, dict[str, float | None]]], ylabel: str) -> Path:
    """One bar panel per ``(title, {label: value})`` (values in [0, 1]; None drawn as an empty slot)."""
    plt = _pyplot()
    panels = [(t, d) for t, d in panels if d]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 0.5 * sum(len(d) for _, d in panels) + 2), 3.6),
                             squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        labels = list(data)
        values = [0.0 if v is None else v for v in data.values()]
        bars = ax.bar(range(len(labels)), values, color="tab:blue")
        ax.bar_label(bars, labels=[fmt(v, 2) for v in data.values()], fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 3 else 0, ha="right", fontsize=8)
        ax.set(ylim=(0, 1.05), ylabel=ylabel, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def histograms(path: str | Path, panels: list[tuple[str, dict[str, list[float]]]], xlabel: str) -> Path:
    """One panel per ``(title, {group: values})``, the groups overlaid on shared bins."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels):
        values = [v for vs in groups.values() for v in vs]
        bins = 20
        if values:
            lo, hi = min(values), max(values)
            bins = [lo + (hi - lo + 1e-9) * i / 20 for i in range(21)]
        for name, vs in groups.items():
            if vs:
                ax.hist(vs, bins=bins, alpha=0.55, label=f"{name} (n={len(vs)})")
        ax.set(title=title, xlabel=xlabel, ylabel="responses")
        if values:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def rates_by(keys: Sequence, flags: Sequence[bool], rate: str) -> dict:
    """``{key: {"n", "count", rate}}`` where ``rate`` is the fraction of True flags; None keys are skipped."""
    out: dict = {}
    for key, flag in zip(keys, flags):
        if key is None:
            continue
        entry = out.setdefault(str(key), {"n": 0, "count": 0})
        entry["n"] += 1
        entry["count"] += bool(flag)
    for entry in out.values():
        entry[rate] = entry["count"] / entry["n"]
    return out


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a batch of token sequences (1 = no repetition)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
