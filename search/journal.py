"""The trial record: an Optuna study in any Optuna storage (SQLite in the output folder by
default), so `optuna-dashboard <storage>` reads a search while it runs.

Each finished trial holds its genome as Optuna parameters (one per gene, in parameter units),
the fitness as its value (the per-task vector for multi-objective samplers), and as user
attributes: the per-task scores and stderrs, the fitness, timings, the recipe hash, the
generation and, for a failed candidate, the error.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from evomerge.merge.recipe import Recipe
from evomerge.search.errors import SearchError
from evomerge.search.records import Gene, Outcome, TrialRecord

optuna.logging.set_verbosity(logging.WARNING)


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16]


class Journal:
    def __init__(
        self,
        storage: str,
        study_name: str,
        genes: list[Gene],
        objectives: list[str],
        fingerprint: str,
        *,
        multi_objective: bool = False,
        resume: bool = False,
        where: str = "",
    ):
        self.genes = genes
        self.objectives = objectives
        self.multi_objective = multi_objective
        directions = ["maximize"] * (len(objectives) if multi_objective else 1)
        try:
            self.study = optuna.create_study(
                storage=storage, study_name=study_name, directions=directions, load_if_exists=True
            )
        except ValueError as exc:  # directions differ from the stored study's
            raise SearchError(f"{where}study {study_name!r} in {storage}: {exc}") from None
        attrs = self.study.user_attrs
        stored = attrs.get("fingerprint")
        n_trials = len(self.study.get_trials(deepcopy=False))
        if stored is None and n_trials == 0:
            self.study.set_user_attr("fingerprint", fingerprint)
            self.study.set_user_attr("genes", [g.name for g in genes])
            self.study.set_user_attr("objectives", objectives)
        elif not resume:
            raise SearchError(
                f"{where}study {study_name!r} in {storage} already holds {n_trials} trials; "
                "pass --resume to continue it, or choose another --out or study name"
            )
        elif stored != fingerprint:
            raise SearchError(
                f"{where}study {study_name!r} in {storage} was made by a different search recipe "
                "(merge, space, fitness, optimizer or seed changed); start a new study instead"
            )
        self.distributions = {g.name: FloatDistribution(g.low, g.high) for g in genes}

    # --- reading ---------------------------------------------------------------------------

    def finished(self) -> list[TrialRecord]:
        """Completed and failed trials, by trial number."""
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        return [self.record(t) for t in sorted(done, key=lambda t: t.number)]

    def running(self) -> list[FrozenTrial]:
        """Trials asked by a process that stopped before telling them (Optuna samplers)."""
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return sorted(trials, key=lambda t: t.number)

    def n_trials(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def record(self, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        genome = [float(trial.params[g.name]) for g in self.genes]
        outcome = Outcome(
            fitness=attrs.get("fitness"),
            fitness_stderr=attrs.get("fitness_stderr"),
            scores=dict(attrs.get("scores", {})),
            stderrs=dict(attrs.get("stderrs", {})),
            error=attrs.get("error"),
            seconds=dict(attrs.get("seconds", {})),
        )
        return TrialRecord(
            trial.number, int(attrs.get("generation", 0)), genome, outcome, attrs.get("recipe", "")
        )

    # --- writing ---------------------------------------------------------------------------

    def attrs(self, generation: int, outcome: Outcome, recipe: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "generation": generation,
            "fitness": outcome.fitness,
            "fitness_stderr": outcome.fitness_stderr,
            "scores": outcome.scores,
            "stderrs": outcome.stderrs,
            "seconds": {k: round(v, 6) for k, v in outcome.seconds.items()},
            "recipe": recipe,
        }
        if outcome.error is not None:
            attrs["error"] = outcome.error
        return attrs

    def values(self, outcome: Outcome) -> list[float] | None:
        if outcome.failed:
            return None
        if self.multi_objective:
            return [outcome.scores[name] for name in self.objectives]
        return [outcome.fitness]  # type: ignore[list-item]

    def add(self, generation: int, genome: list[float], outcome: Outcome, recipe: str) -> int:
        """Store a finished evaluation proposed outside Optuna (Nevergrad); its trial number."""
        trial = optuna.trial.create_trial(
            state=TrialState.FAIL if outcome.failed else TrialState.COMPLETE,
            params={g.name: value for g, value in zip(self.genes, genome, strict=True)},
            distributions=self.distributions,
            values=self.values(outcome),
            user_attrs=self.attrs(generation, outcome, recipe),
        )
        self.study.add_trial(trial)
        return self.n_trials() - 1

    def get_attr(self, key: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(key, default)

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)
