"""Make lm-eval task objects cheap to run again and again: built once per search, not per candidate.

lm-eval's `evaluate` calls `task.build_all_requests` on every run: it renders every prompt (Jinja,
few-shot sampling) and creates fresh `Instance` objects, which costs more than scoring a tiny
model. Requests depend on the task and the run settings, never on the weights, so the first build
is kept and later runs reuse the same instances with their responses cleared. The evaluation
documents are likewise read out of the Arrow table once, instead of row by row on every run.

`evaluate` aggregates per-document metric values without returning them (unless every sample is
logged, which serializes and hashes each document); `metric_values` keeps them, for standard
errors when bootstrapping is off.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lm_eval.api.task import Task

_KEY_ARGS = (
    "limit",
    "rank",
    "world_size",
    "system_instruction",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "tokenizer_name",
)


def make_reusable(task: Task) -> None:
    _freeze_docs(task)
    _record_values(task)
    _replay_requests(task)


def metric_values(task: Task) -> dict[tuple[str, str], list[Any]]:
    """(metric, filter) -> per-document values of the task's latest run."""
    calls: list[dict[str, Any]] = task._evomerge_values
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    # `evaluate` scores every document under the first filter, then under the next, and so on.
    per_filter = len(calls) // len(filters)
    values: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for i, metrics in enumerate(calls):
        for metric, value in metrics.items():
            values[(metric, filters[i // per_filter])].append(value)
    return dict(values)


def _freeze_docs(task: Task) -> None:
    docs = list(task.eval_docs)
    # `eval_docs` reads the test split when there is one, else the validation split.
    name = "test_docs" if task.has_test_docs() else "validation_docs"
    setattr(task, name, lambda: docs)


def _record_values(task: Task) -> None:
    process_results = task.process_results
    task._evomerge_values = []

    def process_and_record(doc: Any, results: Any) -> dict[str, Any]:
        metrics = process_results(doc, results)
        task._evomerge_values.append(metrics)
        return metrics

    task.process_results = process_and_record


def _replay_requests(task: Task) -> None:
    build = task.build_all_requests
    built: dict[tuple[Any, ...], list] = {}

    def build_or_replay(**kwargs: Any) -> None:
        samples = kwargs.get("samples")
        key = (*(kwargs.get(name) for name in _KEY_ARGS), tuple(samples) if samples else None)
        if key not in built:
            build(**kwargs)
            built[key] = list(task._instances)
        for instance in built[key]:
            # New objects, not cleared ones: a previous run's results may still refer to these.
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = list(built[key])
        task._evomerge_values = []  # a run starts here

    task.build_all_requests = build_or_replay
