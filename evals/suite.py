"""The tasks of one split, built and configured once per search, with the metrics to read.

Configuring a task here does what `lm_eval.simple_evaluate` does to the tasks it loads (generation
kwargs, few-shot count, few-shot seed), so a run scores exactly like `lm-eval run` with the same
settings; it is done once instead of per candidate, and documents and requests are reused
(see `reuse.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lm_eval.api.task import Task
from lm_eval.tasks.manager import TaskDict

from evomerge.evals.catalog import TaskCatalog
from evomerge.evals.errors import EvalError
from evomerge.evals.reuse import make_reusable
from evomerge.evals.spec import EvalSettings, FitnessSpec, Split, TaskSpec


@dataclass(frozen=True)
class Selection:
    """A fitness entry resolved against its task: the result key to read, and its weight."""

    task: str
    metric: str
    filter: str
    weight: float


class Rows(list):
    """Document indices; lm-eval tests `i in rows` for every document, so make that O(1)."""

    def __init__(self, rows: Sequence[int]):
        super().__init__(rows)
        self._members = frozenset(rows)

    def __contains__(self, item: object) -> bool:
        return item in self._members


@dataclass
class TaskSuite:
    name: str  # 'fitness', 'heldout' or 'tasks'
    task_dict: TaskDict
    settings: EvalSettings
    selections: list[Selection] | None  # None: report every metric of every task
    samples: dict[str, list[int]] | None  # explicit rows per task, else `settings.limit` applies

    @property
    def tasks(self) -> dict[str, Task]:
        return self.task_dict["tasks"]

    @property
    def limit(self) -> int | float | None:
        return None if self.samples is not None else self.settings.limit

    def rows(self, task: str) -> list[int]:
        """The document indices of `task` this split scores, in order."""
        if self.samples is not None:
            return list(self.samples[task])
        return _rows(task, self.tasks[task], None, self.settings.limit)


def suite_from_names(
    catalog: TaskCatalog, names: Sequence[str], settings: EvalSettings
) -> TaskSuite:
    """Every metric of the named tasks, groups or tags (what `evomerge eval --tasks` reports)."""
    task_dict = catalog.load(list(dict.fromkeys(names)))
    _configure(task_dict["tasks"], settings)
    return TaskSuite("tasks", task_dict, settings, None, None)


def suite_from_spec(catalog: TaskCatalog, spec: FitnessSpec, split: Split) -> TaskSuite | None:
    """The fitness or held-out split of a spec; None for a held-out split nobody asked for."""
    entries = spec.entries(split)
    if not entries:
        return None
    task_dict = catalog.load(list(dict.fromkeys(e.task for e in entries)), leaf_only=True)
    tasks = task_dict["tasks"]
    settings = spec.settings()
    selections = [_select(entry, tasks[entry.task], split) for entry in entries]
    rows = {e.task: e.rows for e in entries}
    samples = None
    if any(r is not None for r in rows.values()):
        samples = {name: _rows(name, tasks[name], rows[name], settings.limit) for name in tasks}
    _configure(tasks, settings)
    return TaskSuite(split, task_dict, settings, selections, samples)


def prepare_suites(spec: FitnessSpec, catalog: TaskCatalog | None = None) -> dict[str, TaskSuite]:
    """Both splits of a spec, built before any model exists so task problems surface first."""
    catalog = catalog or TaskCatalog(spec.include_path)
    suites = {split: suite_from_spec(catalog, spec, split) for split in ("fitness", "heldout")}
    return {name: suite for name, suite in suites.items() if suite is not None}


def produced_metrics(task: Task) -> tuple[list[str], list[str]]:
    """(metric names, filter names) a task reports, known before it runs."""
    metrics = list(getattr(task, "_metric_fn_list", None) or task.aggregation())
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return metrics, filters


def _select(entry: TaskSpec, task: Task, split: str) -> Selection:
    metric, _, filter_name = entry.metric.partition(",")
    metrics, filters = produced_metrics(task)
    where = f"fitness spec ({split}): task {entry.task}"
    if metric not in metrics:
        raise EvalError(
            f"{where} does not produce metric {metric!r}; it produces {', '.join(metrics)}"
        )
    if filter_name and filter_name not in filters:
        raise EvalError(f"{where} has no filter {filter_name!r}; its filters: {', '.join(filters)}")
    if not filter_name:
        if len(filters) > 1:
            raise EvalError(
                f"{where} reports {metric} under filters {', '.join(filters)}: name one, "
                f"e.g. metric: {metric},{filters[0]}"
            )
        filter_name = filters[0]
    return Selection(entry.task, metric, filter_name, entry.weight)


def _rows(
    name: str, task: Task, rows: tuple[int, int] | None, limit: int | float | None
) -> list[int]:
    total = len(task.eval_docs)
    start, end = rows if rows is not None else (0, total)
    if end > total:
        raise EvalError(
            f"fitness spec: rows {start}:{end} of task {name} run past its {total} documents; "
            f"end the range at {total} or below"
        )
    picked = range(start, end)
    if limit is not None:
        count = math.ceil(len(picked) * limit) if limit < 1 else int(limit)
        picked = picked[:count]
    return Rows(picked)


def _configure(tasks: dict[str, Task], settings: EvalSettings) -> None:
    """The overrides `simple_evaluate` applies to loaded tasks, applied once."""
    gen_kwargs = settings.generation.gen_kwargs()
    for name, task in tasks.items():
        if getattr(task, "UNSAFE_CODE", False):
            raise EvalError(f"task {name} runs model-generated code; evomerge does not run it")
        if task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
        if settings.num_fewshot is not None:
            # Like lm-eval: a task that pins num_fewshot: 0 in its YAML keeps it.
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=settings.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=settings.fewshot_seed)
        make_reusable(task)


def generation_record(task: Task, default_max_gen_toks: int) -> dict[str, Any] | None:
    """The generation settings a task actually runs with, for the result record."""
    if task.get_config("output_type") != "generate_until":
        return None
    from lm_eval.models.utils import normalize_gen_kwargs

    return dict(
        normalize_gen_kwargs(task.get_config("generation_kwargs") or {}, default_max_gen_toks)
    )
