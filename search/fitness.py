"""What each candidate's fitness costs: the fitness mode (`evomerge.evals.modes`) run inside the
search loop.

A `FitnessPolicy` hands each proposal a ticket (every row, for the plain full scoring), and a
ticket is the only way a candidate is scored: the executor materializes the candidate, then
runs `ticket.run(score)`, where `score(rows)` scores the model on those rows of each fitness
task and returns an EvalResult with per-row values. The executor adds timings; the loop tells
the policy every outcome in trial order (`finished`) and every finished generation
(`generation_done`), so that racing knows the bar of the generation and IRT can calibrate on it.

    policy = make_policy(recipe, suites, journal, optuna=..., population=...)
    policy.prepare(executor)            # IRT: the sources' per-row correctness
    tickets = [policy.ticket(p) for p in proposals]
    ...
    rescored = policy.rescore(trials, executor, space)   # the best, scored on every row

Every ticket is deterministic given the seed, the proposal and what came before it in trial
order, so a resumed search makes the same trials; a racing candidate saves each chunk's rows
in the study as it goes and, resumed, continues from the next chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.evals.estimate import Estimate, subset_estimate
from evomerge.evals.irt import Calibration, allocate, calibrate, predict
from evomerge.evals.modes import FullMode, IrtMode, MinibatchMode, RacingMode
from evomerge.evals.results import EvalResult
from evomerge.evals.suite import TaskSuite
from evomerge.search.errors import SearchError
from evomerge.search.observers import Observer
from evomerge.search.records import Outcome, TrialRecord

Scorer = Callable[[dict[str, list[int]] | None], EvalResult]  # rows per task (None: all)
INFLIGHT = "racing.inflight"  # study attribute: the chunks of the racing candidate in flight
IRT_SOURCES = "irt.sources"  # study attribute: the sources' per-row values (IRT calibration)


@dataclass
class FitnessRows:
    """The fitness split's rows: per task, its document indices and its weight."""

    ids: dict[str, list[int]]
    weights: dict[str, float]

    @classmethod
    def of(cls, suite: TaskSuite) -> FitnessRows:
        assert suite.selections is not None
        return cls(
            {s.task: suite.rows(s.task) for s in suite.selections},
            {s.task: s.weight for s in suite.selections},
        )

    @property
    def totals(self) -> dict[str, int]:
        return {task: len(ids) for task, ids in self.ids.items()}

    @property
    def count(self) -> int:
        return sum(self.totals.values())

    def sample(self, count: int, rng: np.random.Generator) -> dict[str, list[int]]:
        """`count` rows spread over the tasks by their sizes, drawn without replacement."""
        quota = allocate(count, self.totals)
        return {
            t: sorted(rng.choice(ids, quota[t], replace=False).tolist())
            for t, ids in self.ids.items()
        }

    def chunks(self, size: int, rng: np.random.Generator) -> list[dict[str, list[int]]]:
        """Every row once, in a seeded order, in chunks of about `size` rows; each chunk
        holds rows of every task in proportion to its size."""
        order = {t: rng.permutation(ids).tolist() for t, ids in self.ids.items()}
        n = max(1, -(-self.count // size))
        n = min(n, min(self.totals.values()))  # every chunk needs a row of every task
        return [
            {
                t: sorted(ids[len(ids) * k // n : len(ids) * (k + 1) // n])
                for t, ids in order.items()
            }
            for k in range(n)
        ]


def estimate_outcome(
    estimate: Estimate, result: EvalResult, *, stopped: bool = False, keep_rows: bool = False
) -> Outcome:
    return Outcome(
        fitness=estimate.fitness,
        fitness_stderr=estimate.stderr,
        scores=dict(estimate.scores),
        stderrs=dict(estimate.stderrs),
        decoding=result.settings.get("decoding"),
        rows=estimate.rows,
        full=estimate.full,
        stopped=stopped,
        row_values=dict(result.rows) if keep_rows else None,
    )


# --- tickets: what the executor runs for one candidate -----------------------------------------


def outcome_of(result: EvalResult, seconds: dict[str, float] | None = None) -> Outcome:
    """An outcome as lm-eval aggregated the result (exact for any metric), per-row values kept."""
    return Outcome(
        fitness=result.fitness,
        fitness_stderr=result.fitness_stderr,
        scores={s.task: s.value for s in result.scores},
        stderrs={s.task: s.stderr for s in result.scores},
        seconds=dict(seconds or {}),
        decoding=result.settings.get("decoding"),
        rows=sum(map(len, result.rows.values())) if result.rows else None,
        row_values=dict(result.rows) if result.rows else None,
    )


@dataclass
class FullTicket:
    """Every row, keeping the per-row values (what strategies and IRT learn from). With
    `aggregate` the fitness is lm-eval's own aggregation of each metric (plain full scoring:
    exact for any metric); else the mean of the rows (IRT calibration, mean metrics only)."""

    rows: FitnessRows
    aggregate: bool = False

    def run(self, score: Scorer) -> Outcome:
        result = score(None)
        if self.aggregate:
            return outcome_of(result)
        estimate = subset_estimate(result.rows, self.rows.totals, self.rows.weights)
        return estimate_outcome(estimate, result, keep_rows=True)


@dataclass
class SubsetTicket:
    """The rows of this generation's minibatch."""

    rows: FitnessRows
    subset: dict[str, list[int]]

    def run(self, score: Scorer) -> Outcome:
        result = score(self.subset)
        return estimate_outcome(
            subset_estimate(result.rows, self.rows.totals, self.rows.weights), result
        )


@dataclass
class AnchorTicket:
    """The anchor rows, and the IRT estimate of the full-set score from them."""

    calibration: Calibration
    weights: dict[str, float]

    def run(self, score: Scorer) -> Outcome:
        model, anchors = self.calibration.model, self.calibration.anchors
        request: dict[str, list[int]] = {}
        for j in anchors:
            request.setdefault(model.tasks[j], []).append(model.ids[j])
        result = score(request)
        position = {(model.tasks[j], model.ids[j]): j for j in anchors}
        answers = {
            position[(t, i)]: v
            for t in request
            for i, v in zip(sorted(request[t]), result.rows[t], strict=True)
        }
        estimate = predict(
            model, anchors, [answers[j] for j in anchors], self.weights, self.calibration.misfit
        )
        return estimate_outcome(estimate, result)


@dataclass
class RaceTicket:
    """Chunk after chunk until every row is scored, or `stop(estimate)` says the candidate
    cannot matter. Each chunk's rows go to `save` as soon as they are scored; `saved` holds
    those of an earlier, interrupted run of this same candidate."""

    rows: FitnessRows
    chunks: list[dict[str, list[int]]]
    stop: Callable[[Estimate, int], bool]
    save: Callable[[list[dict[str, list[float]]]], None]
    saved: list[dict[str, list[float]]] = field(default_factory=list)

    def run(self, score: Scorer) -> Outcome:
        values: dict[str, list[float]] = {t: [] for t in self.rows.ids}
        done = list(self.saved)
        result = EvalResult("fitness", [])
        for k, chunk in enumerate(self.chunks):
            if k < len(done):
                got = done[k]
            else:
                result = score(chunk)
                got = {t: result.rows[t] for t in chunk}
                done.append(got)
                self.save(done)
            for task, row_values in got.items():
                values[task] += row_values
            estimate = subset_estimate(values, self.rows.totals, self.rows.weights)
            if k < len(self.chunks) - 1 and self.stop(estimate, k):
                return estimate_outcome(estimate, result, stopped=True)
        return estimate_outcome(estimate, result)


# --- policies ----------------------------------------------------------------------------------


class FitnessPolicy(Observer):
    """Full scoring: every candidate on every row. Subclasses buy less."""

    name = "full"

    def __init__(self, rows: FitnessRows, journal: Any, seed: int, rescore: int):
        self.rows, self.journal, self.seed, self.rescore_count = rows, journal, seed, rescore
        self.extra_rows = 0  # rows scored outside trials (re-scoring)
        self.source_results: dict[str, dict[str, EvalResult]] = {}  # scored early, for reuse

    def prepare(self, executor: Any) -> None:
        """Before the first proposal."""

    def ticket(self, proposal: Any) -> Any:
        return FullTicket(self.rows, aggregate=True)

    def finished(self, proposal: Any, outcome: Outcome) -> None:
        """Each outcome, in trial order (resumed ones included)."""

    def generation_done(self, generation: int, outcomes: list[Outcome]) -> None:
        """After a generation's outcomes were recorded and told."""

    def rescore(self, trials: Sequence[TrialRecord], executor: Any, space: Any) -> dict[int, dict]:
        """The `rescore` best trials by fitness, those of them scored on fewer rows now scored
        on every fitness row (kept in the study, so a resumed search does not score them again):
        trial number -> full result."""
        done: dict[str, dict] = dict(self.journal.get_attr("rescored", {}))
        ranked = sorted(
            (t for t in trials if not t.outcome.failed),
            key=lambda t: (-t.outcome.fitness, t.number),  # type: ignore[operator]
        )
        for trial in ranked[: self.rescore_count]:
            if trial.outcome.full or str(trial.number) in done:
                continue
            result = executor.score(space.candidate(trial.genome), "fitness")
            done[str(trial.number)] = {
                "fitness": result.fitness,
                "fitness_stderr": result.fitness_stderr,
                "scores": {s.task: s.value for s in result.scores},
            }
            self.journal.set_attr("rescored", done)
        self.extra_rows += self.rows.count * len(done)
        return {int(k): v for k, v in done.items()}


class MinibatchPolicy(FitnessPolicy):
    name = "minibatch"

    def __init__(self, *args: Any, mode: MinibatchMode):
        super().__init__(*args)
        if mode.rows >= self.rows.count:
            raise SearchError(
                f"fitness.mode.rows: {mode.rows} rows is the whole fitness set "
                f"({self.rows.count}); use fewer, or mode: full"
            )
        self.size = mode.rows

    def subset(self, generation: int) -> dict[str, list[int]]:
        return self.rows.sample(self.size, np.random.default_rng([self.seed, generation]))

    def ticket(self, proposal: Any) -> SubsetTicket:
        return SubsetTicket(self.rows, self.subset(proposal.generation))


class IrtPolicy(FitnessPolicy):
    name = "irt"

    def __init__(self, *args: Any, mode: IrtMode, sources: list[str]):
        super().__init__(*args)
        if mode.anchors >= self.rows.count:
            raise SearchError(
                f"fitness.mode.anchors: {mode.anchors} anchors is the whole fitness set "
                f"({self.rows.count}); use fewer, or mode: full"
            )
        self.mode, self.sources = mode, sources
        self.calibration: Calibration | None = None
        self.source_rows: list[dict[str, list[float]]] = []
        self.calibrating: list[dict[str, list[float]]] = []

    def prepare(self, executor: Any) -> None:
        """The sources' per-row correctness: from the scoring of the sources every search does
        for its report (kept for it in `source_results`, so they cost no extra rows)."""
        stored = self.journal.get_attr(IRT_SOURCES)
        if stored is None:
            for model in self.sources:
                self.source_results[model] = executor.score_source(model)
            stored = [self.source_results[m]["fitness"].rows for m in self.sources]
            self.journal.set_attr(IRT_SOURCES, stored)
        self.source_rows = stored
        fitted = self.journal.get_attr("irt.calibration")
        if fitted is not None:
            self.calibration = Calibration.from_dict(fitted)
        elif self.mode.calibrate == 0:
            self._fit()

    def ticket(self, proposal: Any) -> FullTicket | AnchorTicket:
        if self.calibration is None:
            return FullTicket(self.rows)
        return AnchorTicket(self.calibration, self.rows.weights)

    def finished(self, proposal: Any, outcome: Outcome) -> None:
        if self.calibration is None and outcome.row_values is not None:
            self.calibrating.append(outcome.row_values)

    def generation_done(self, generation: int, outcomes: list[Outcome]) -> None:
        if self.calibration is None and generation + 1 >= self.mode.calibrate:
            self._fit()

    def _fit(self) -> None:
        tasks = [t for t, ids in self.rows.ids.items() for _ in ids]
        ids = [i for ids in self.rows.ids.values() for i in ids]
        matrix = np.array(
            [
                [v for t in self.rows.ids for v in rows[t]]
                for rows in [*self.source_rows, *self.calibrating]
            ]
        )
        self.calibration = calibrate(
            matrix,
            tasks,
            ids,
            self.rows.weights,
            anchors=self.mode.anchors,
            dims=self.mode.dims,
            seed=self.seed,
        )
        self.journal.set_attr("irt.calibration", self.calibration.to_dict())


class RacingPolicy(FitnessPolicy):
    """Nevergrad: stop once the upper bound falls below the lower bound of the generation's
    last parent. Optuna: report the estimate after each chunk and ask the study's pruner."""

    name = "racing"

    def __init__(self, *args: Any, mode: RacingMode, optuna: bool, population: int):
        super().__init__(*args)
        self.mode, self.optuna = mode, optuna
        self.parents = mode.parents or max(1, population // 2)
        self.chunks = self.rows.chunks(mode.chunk, np.random.default_rng([self.seed, 7]))
        self.bounds: dict[int, list[float]] = {}  # generation -> finished candidates' lower bounds
        # Only the first candidate after a resume can have been in flight: read it once.
        self.interrupted: dict = self.journal.get_attr(INFLIGHT) or {}
        if optuna:
            self.journal.study.pruner = make_pruner(mode)

    def bar(self, generation: int) -> float:
        bounds = sorted(self.bounds.get(generation, []), reverse=True)
        return bounds[self.parents - 1] if len(bounds) >= self.parents else -np.inf

    def finished(self, proposal: Any, outcome: Outcome) -> None:
        if outcome.failed:
            return
        lower = outcome.fitness - self.mode.z * (outcome.fitness_stderr or 0.0)  # type: ignore[operator]
        self.bounds.setdefault(proposal.generation, []).append(lower)

    def ticket(self, proposal: Any) -> RaceTicket:
        key = {"number": proposal.number, "genome": [round(g, 12) for g in proposal.genome]}
        saved = self.interrupted.get("chunks", []) if self.interrupted.get("key") == key else []
        self.interrupted = {}

        def save(chunks: list[dict[str, list[float]]]) -> None:
            self.journal.set_attr(INFLIGHT, {"key": key, "chunks": chunks})

        if self.optuna:
            trial = proposal.handle

            def stop(estimate: Estimate, step: int) -> bool:
                trial.report(estimate.fitness, step)
                return trial.should_prune()
        else:
            bar = self.bar(proposal.generation)

            def stop(estimate: Estimate, step: int) -> bool:
                return estimate.upper(self.mode.z) < bar

        return RaceTicket(self.rows, self.chunks, stop, save, saved)


def planned_rows(mode: Any, evaluations: int, population: int, rows: int, rescore: int) -> int:
    """The fitness rows a search is expected to score (racing: at most; its stops depend on
    the candidates), for --dry-run."""
    if isinstance(mode, MinibatchMode):
        return evaluations * min(mode.rows, rows) + rescore * rows
    if isinstance(mode, IrtMode):
        calibrating = min(evaluations, mode.calibrate * population)
        return calibrating * rows + (evaluations - calibrating) * mode.anchors + rescore * rows
    return evaluations * rows


def make_pruner(mode: RacingMode) -> Any:
    import optuna

    cls = getattr(optuna.pruners, mode.pruner, None)
    if not isinstance(cls, type) or not issubclass(cls, optuna.pruners.BasePruner):
        raise SearchError(
            f"fitness.mode.pruner: {mode.pruner!r} is not an Optuna pruner (e.g. MedianPruner, "
            "SuccessiveHalvingPruner, HyperbandPruner, PercentilePruner)"
        )
    try:
        return cls(**mode.pruner_options)
    except TypeError as exc:
        raise SearchError(f"fitness.mode.pruner_options: {mode.pruner}: {exc}") from None


def check_mode(mode: Any, executor: str) -> None:
    """What a mode refuses before anything loads."""
    if isinstance(mode, RacingMode):
        if executor == "ray":
            raise SearchError(
                "fitness.mode: racing decides chunk by chunk with what the generation has "
                "scored so far; run it with executor: serial, or use minibatch or irt on Ray"
            )
        make_pruner(mode)


def check_mean_metrics(suite: TaskSuite, mode: str) -> None:
    """A fitness from some rows needs metrics that are means over rows."""
    from lm_eval.api.metrics import mean

    for s in suite.selections or []:
        aggregation = suite.tasks[s.task].aggregation().get(s.metric)
        if aggregation is not mean:
            name = getattr(aggregation, "__name__", aggregation)
            raise SearchError(
                f"fitness.mode: {mode} estimates a fitness from some rows, but {s.task}'s "
                f"{s.metric} aggregates with {name}, not a mean over rows; use mode: full"
            )


def make_policy(
    recipe: Any, suites: dict[str, TaskSuite], journal: Any, *, optuna: bool, population: int
) -> FitnessPolicy:
    mode = recipe.fitness.mode
    args = (FitnessRows.of(suites["fitness"]), journal, recipe.seed, recipe.fitness.rescore)
    if isinstance(mode, FullMode):
        return FitnessPolicy(*args)
    check_mean_metrics(suites["fitness"], mode.type)
    if isinstance(mode, MinibatchMode):
        return MinibatchPolicy(*args, mode=mode)
    if isinstance(mode, IrtMode):
        return IrtPolicy(*args, mode=mode, sources=recipe.merge.referenced_models())
    return RacingPolicy(*args, mode=mode, optuna=optuna, population=population)
