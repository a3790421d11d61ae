"""Checkpoint selection during training: the best evaluation so far by one metric, and early stopping.

The SIRL paper picks its checkpoint by early stopping at about step 30; entropy minimisation is known to collapse
into repetition if it runs on. ``keep_best=METRIC`` keeps the model of the best evaluation in ``OUTPUT_DIR/best``
(``keep_best_mode`` max or min); ``early_stop_patience=P`` ends the run after P evaluations in a row without a
new best. The first evaluation (step 0, the untrained model) is the first best, so ``best/`` may well hold the
model as it was before training: that is the honest answer when training did not help.

A tie is not an improvement; a missing or NaN value (e.g. no answers) is never a best and counts toward the
patience. The tracker's state goes into every checkpoint, so a resumed run keeps its best and its count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class BestTracker:
    metric: str | None = None  # None: nothing is tracked, never stops
    mode: str = "max"
    patience: int = 0  # evaluations without a new best before stopping; 0 = never stop
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")

    def is_better(self, value) -> bool:
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def update(self, step: int, metrics: dict) -> bool:
        """Records one evaluation; True when it is a new best (the caller then saves the model)."""
        if self.metric is None:
            return False
        value = metrics.get(self.metric)
        if self.is_better(value):
            self.best_value, self.best_step, self.evals_since_best = float(value), step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.metric is not None and self.patience > 0 and self.evals_since_best >= self.patience

    def describe(self) -> str:
        best = "none yet" if self.best_value is None else f"{self.best_value:.4g} at step {self.best_step}"
        return f"{self.metric} ({self.mode}): best {best}, {self.evals_since_best} evaluation(s) since"

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("best_value", "best_step", "evals_since_best")}

    def load_state_dict(self, state: dict | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)
