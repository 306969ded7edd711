"""What a scoring run returns: per-task metrics with sample counts and standard errors, the
weighted fitness, and the settings that produced them (generation budget included)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Score:
    """One metric of one task: `value` over `n` documents, with its standard error."""

    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    n: int
    weight: float | None = None  # set for fitness-spec entries

    @property
    def name(self) -> str:
        return f"{self.task}/{self.metric},{self.filter}"


@dataclass
class EvalResult:
    split: str  # 'fitness', 'heldout', or 'tasks' for a plain task list
    scores: list[Score]
    fitness: float | None = None  # weighted mean of the spec's entries
    fitness_stderr: float | None = None
    generation: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> gen kwargs
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    rows: dict[str, list[float]] = field(default_factory=dict, repr=False)  # task -> per document

    @property
    def vector(self) -> list[float]:
        """The per-entry values in spec order, for multi-objective search."""
        return [s.value for s in self.scores]

    @property
    def outside_forward_share(self) -> float:
        return 1.0 - self.forward_seconds / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self, *, with_samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_samples:
            data.pop("samples")
            data.pop("rows")
        return data

    def table(self) -> str:
        rows = [("task", "metric", "filter", "n", "value", "± stderr")]
        for s in self.scores:
            stderr = "" if s.stderr is None else f"{s.stderr:.4f}"
            rows.append((s.task, s.metric, s.filter, str(s.n), f"{s.value:.4f}", stderr))
        if self.fitness is not None:
            stderr = "" if self.fitness_stderr is None else f"{self.fitness_stderr:.4f}"
            rows.append((f"{self.split} (weighted)", "", "", "", f"{self.fitness:.4f}", stderr))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                cell.rjust(w) if i >= 3 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def weighted_mean(scores: list[Score]) -> tuple[float, float | None]:
    """Weighted mean of the values and its standard error (entries taken as independent)."""
    total = sum(s.weight or 0.0 for s in scores)
    value = sum((s.weight or 0.0) * s.value for s in scores) / total
    if any(s.stderr is None for s in scores):
        return value, None
    variance = sum(((s.weight or 0.0) / total * s.stderr) ** 2 for s in scores)  # type: ignore[operator]
    return value, math.sqrt(variance)
