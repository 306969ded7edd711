"""What a search produces, in plain data: genes, evaluated trials, and the scores of reference
models. The journal (an Optuna study) stores these; the report and the command read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.evals.results import EvalResult


@dataclass(frozen=True)
class Gene:
    """One searched number: `param` of `model` (None: a recipe-wide parameter) for the tensors
    matching `filter` (None: all of them) in layers `layers` = [start, end) (None: all)."""

    name: str  # stable, unique, used as the Optuna parameter name
    param: str
    model: str | None
    filter: str | None
    layers: tuple[int, int] | None
    low: float
    high: float
    init: float
    sigma: float

    @property
    def row(self) -> str:
        """The gene's row in a per-layer table: everything but the layer group."""
        parts = [self.param, self.model or "*"]
        if self.filter is not None:
            parts.append(self.filter)
        return "/".join(parts)


@dataclass
class Outcome:
    """One candidate's evaluation. `fitness` is None when it failed (then `error` says why)."""

    fitness: float | None
    fitness_stderr: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # fitness entry name -> value
    stderrs: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # materialize, evaluate, optimizer
    decoding: str | None = None  # how generations ran: 'fast greedy', or generate() and why
    rows: int | None = None  # fitness rows scored (None: every row, before modes existed)
    full: bool = True  # scored on every fitness row: `fitness` is exact, not an estimate
    stopped: bool = False  # racing stopped it early; `fitness` estimates from the rows it saw
    row_values: dict[str, list[float]] | None = None  # per task, per row (IRT calibration)

    @property
    def failed(self) -> bool:
        return self.fitness is None


@dataclass
class TrialRecord:
    """A finished trial as the journal holds it."""

    number: int
    generation: int
    genome: list[float]  # gene values in `Gene` order, in parameter units
    outcome: Outcome
    recipe_hash: str


@dataclass
class ModelScores:
    """A reference model's scores on both splits: a source, the uniform merge, a baseline
    (search/baselines.py) or the best."""

    name: str
    kind: str  # 'source', 'uniform', 'hand', 'grid', 'random', 'recipe' or 'best'
    fitness: dict[str, tuple[float, float | None]]  # entry -> (value, stderr)
    heldout: dict[str, tuple[float, float | None]]
    fitness_total: float | None = None
    heldout_total: float | None = None
    heldout_total_stderr: float | None = None
    cost: int | None = None  # fitness evaluations spent finding it (None: not a search result)

    @classmethod
    def of(
        cls, name: str, kind: str, results: dict[str, EvalResult], cost: int | None = None
    ) -> ModelScores:
        """A model's scores from its results on each split."""

        def table(split: str) -> dict[str, tuple[float, float | None]]:
            result = results.get(split)
            return {s.task: (s.value, s.stderr) for s in result.scores} if result else {}

        heldout = results.get("heldout")
        return cls(
            name=name,
            kind=kind,
            fitness=table("fitness"),
            heldout=table("heldout"),
            fitness_total=results["fitness"].fitness if "fitness" in results else None,
            heldout_total=heldout.fitness if heldout else None,
            heldout_total_stderr=heldout.fitness_stderr if heldout else None,
            cost=cost,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "fitness": {k: list(v) for k, v in self.fitness.items()},
            "heldout": {k: list(v) for k, v in self.heldout.items()},
            "fitness_total": self.fitness_total,
            "heldout_total": self.heldout_total,
            "heldout_total_stderr": self.heldout_total_stderr,
            "cost": self.cost,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelScores:
        return cls(
            name=data["name"],
            kind=data["kind"],
            fitness={k: (v[0], v[1]) for k, v in data["fitness"].items()},
            heldout={k: (v[0], v[1]) for k, v in data["heldout"].items()},
            fitness_total=data.get("fitness_total"),
            heldout_total=data.get("heldout_total"),
            heldout_total_stderr=data.get("heldout_total_stderr"),
            cost=data.get("cost"),
        )


@dataclass
class SearchSummary:
    """Everything the report shows."""

    title: str
    genes: list[Gene]
    trials: list[TrialRecord]  # in trial-number order, failed ones included
    best: TrialRecord | None
    references: list[ModelScores]  # sources, uniform merge, best
    objectives: list[str]  # fitness entry names, in order
    pareto: list[int] = field(default_factory=list)  # trial numbers on the front (multi-objective)
    best_recipe_yaml: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # optimizer, budget, seed, device ...
    cost: dict[str, Any] = field(default_factory=dict)  # fitness rows scored (loop.fitness_cost)
