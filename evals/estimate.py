"""A fitness from some of the fitness rows: per-task means of the rows scored, their weighted
mean, and a standard error that shrinks to zero as the rows scored reach every row.

The fitness is the weighted mean over tasks of each task's mean over its N fitness rows. From
n of them, drawn without replacement, a task's mean has variance s^2 / n * (1 - n / N) (the
finite-population correction: the target is the mean over those N rows, not over a wider
population). For 0/1 metrics s^2 comes from (k + 1) / (n + 2), so that 5 right out of 5 does not
claim certainty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Estimate:
    fitness: float
    stderr: float
    scores: dict[str, float] = field(default_factory=dict)  # task -> estimated mean
    stderrs: dict[str, float] = field(default_factory=dict)
    rows: int = 0  # rows scored
    full: bool = False  # every fitness row scored: the fitness itself, not an estimate

    def upper(self, z: float) -> float:
        return self.fitness + z * self.stderr

    def lower(self, z: float) -> float:
        return self.fitness - z * self.stderr


def row_variance(values: Sequence[float]) -> float:
    n = len(values)
    if all(v in (0.0, 1.0) for v in values):
        p = (sum(values) + 1) / (n + 2)
        return p * (1 - p) * n / max(n - 1, 1)
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / max(n - 1, 1)


def subset_estimate(
    values: Mapping[str, Sequence[float]],
    totals: Mapping[str, int],
    weights: Mapping[str, float],
) -> Estimate:
    """The fitness from per-task row values (`values[task]`: n of the task's `totals[task]`
    rows; every task needs at least one)."""
    scores, stderrs = {}, {}
    for task, rows in values.items():
        n, total = len(rows), totals[task]
        if n == 0:
            raise ValueError(f"no rows of {task} were scored")
        scores[task] = sum(rows) / n
        shrink = max(0.0, 1 - n / total)
        stderrs[task] = math.sqrt(row_variance(rows) / n * shrink) if shrink else 0.0
    return combine(
        scores,
        stderrs,
        weights,
        rows=sum(map(len, values.values())),
        full=all(len(values[t]) == totals[t] for t in values),
    )


def combine(
    scores: Mapping[str, float],
    stderrs: Mapping[str, float],
    weights: Mapping[str, float],
    *,
    rows: int,
    full: bool,
) -> Estimate:
    """Per-task estimates into the weighted fitness (tasks taken as independent)."""
    total = sum(weights[t] for t in scores)
    fitness = sum(weights[t] * scores[t] for t in scores) / total
    stderr = math.sqrt(sum((weights[t] / total * stderrs[t]) ** 2 for t in scores))
    return Estimate(fitness, stderr, dict(scores), dict(stderrs), rows, full)
