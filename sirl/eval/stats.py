"""Bootstrap intervals for evaluation rates (DSR, over-refusal, a capability score), plain or clustered, and for the
paired difference of two models answering the same prompts.

An evaluation's answers are not independent draws: the 23 attacks of one JailbreakBench behaviour share its topic,
and a model that refuses it directly tends to refuse most of its attacked forms. ``clusters`` (e.g. the behaviour
of each answer) makes the bootstrap resample whole clusters with all their answers, which widens the interval by
as much as the answers of a cluster agree; without it every answer is its own cluster (the i.i.d. bootstrap).
Intervals are percentile intervals of the ratio ``sum of values / number of values`` over ``n_boot`` resamples,
drawn from a seeded generator, so the same call gives the same interval.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def _cluster_sums(values: Sequence[float], clusters: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if clusters is None:
        return x, np.ones_like(x)
    if len(clusters) != len(x):
        raise ValueError(f"{len(x)} values but {len(clusters)} cluster labels")
    index: dict = {}
    ids = np.asarray([index.setdefault(c, len(index)) for c in clusters])
    return np.bincount(ids, weights=x, minlength=len(index)), np.bincount(ids, minlength=len(index)).astype(float)


def _interval(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    stats = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _check(n: int, n_boot: int, level: float) -> None:
    if n == 0:
        raise ValueError("no values to bootstrap")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")


def bootstrap_mean(values: Sequence[float], clusters: Sequence[Hashable] | None = None, *, n_boot: int = 2000,
                   seed: int = 0, level: float = 0.95) -> dict:
    """``{"mean", "lo", "hi", "n", "clusters"}``: the mean of ``values`` (booleans count as 0/1) and its bootstrap
    ``level`` interval, resampling ``clusters`` when given."""
    _check(len(values), n_boot, level)
    sums, counts = _cluster_sums(values, clusters)
    lo, hi = _interval(sums, counts, n_boot, seed, level)
    return {"mean": float(sums.sum() / counts.sum()), "lo": lo, "hi": hi, "n": len(values), "clusters": len(sums)}


def bootstrap_paired_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable] | None = None,
                                *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """``{"diff", "lo", "hi", "n", "clusters"}`` for ``mean(b) - mean(a)`` where ``a[i]`` and ``b[i]`` are two
    models' values on the same item i (the same prompt under the same attack): the items (or their clusters) are
    resampled together, so what the two models share cancels out of the interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    diffs = [float(y) - float(x) for x, y in zip(a, b)]
    out = bootstrap_mean(diffs, clusters, n_boot=n_boot, seed=seed, level=level)
    return {"diff": out.pop("mean"), **out}
