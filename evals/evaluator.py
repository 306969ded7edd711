"""Scoring the model that lives in memory on prepared task suites, again after every new set of
weights: `Evaluator(model, tokenizer, suites).score("fitness")`.

Runs go through `lm_eval.evaluator.evaluate`, the core of `simple_evaluate`, with the tasks and
the HFLM built once. `simple_evaluate` itself would rebuild both and collect environment
information (`pip list`, `git describe`) on every call: about a second per candidate.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from lm_eval.api.metrics import mean, mean_stderr
from lm_eval.evaluator import evaluate
from torch import nn

from evomerge.evals.errors import EvalError
from evomerge.evals.lm import ResidentLM
from evomerge.evals.results import EvalResult, Score, weighted_mean
from evomerge.evals.reuse import metric_values
from evomerge.evals.suite import Rows, TaskSuite, generation_record
from evomerge.evals.timing import ForwardTimer

_LM_EVAL_VERSION = version("lm_eval")
# simple_evaluate's default seeds (python, numpy, torch), so sampling tasks match `lm-eval run`.
_SEEDS = (0, 1234, 1234)


class Evaluator:
    """One HFLM around `model`; `score` reads whatever weights the model holds at that moment."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        suites: dict[str, TaskSuite],
        *,
        quiet: bool = True,
        log_samples: bool = False,
    ):
        if not suites:
            raise EvalError("nothing to evaluate: no task suites were prepared")
        self.suites = suites
        settings = next(iter(suites.values())).settings
        self.lm = ResidentLM(model, tokenizer, batch_size=settings.batch_size)
        self.lm.quiet = quiet
        self.timer = ForwardTimer(model)
        self.log_samples = log_samples  # keep every document's output in EvalResult.samples

    @property
    def batch_size(self) -> int | str:
        """The batch size; 'auto' until the first requests fix it (evals/lm.py)."""
        return self.lm.batch_size_per_gpu

    def score(self, split: str = "fitness", rows: dict[str, list[int]] | None = None) -> EvalResult:
        """The split's tasks on the model as it is now; on the documents `rows` names per task
        (every task of the split, each with at least one document) instead of the split's own.
        The result's `rows` holds each fitness entry's per-document values, in document order."""
        if split not in self.suites:
            raise EvalError(f"no {split!r} split was prepared; have: {', '.join(self.suites)}")
        suite = self.suites[split]
        settings = suite.settings
        samples, limit = suite.samples, suite.limit
        if rows is not None:
            samples, limit = {task: Rows(sorted(rows[task])) for task in suite.tasks}, None
        random.seed(_SEEDS[0])
        np.random.seed(_SEEDS[1])
        torch.manual_seed(_SEEDS[2])
        self.timer.reset()
        paths = (self.lm.greedy_batches, self.lm.generate_batches)
        started = time.perf_counter()
        out = evaluate(
            lm=self.lm,
            task_dict=suite.task_dict,
            limit=limit,
            samples=samples,
            bootstrap_iters=settings.bootstrap_iters,
            log_samples=self.log_samples,
            system_instruction=settings.system_instruction,
            apply_chat_template=settings.apply_chat_template,
            fewshot_as_multiturn=settings.multiturn,
        )
        seconds = time.perf_counter() - started
        assert out is not None  # single process: always rank 0
        scores = _scores(out, suite)
        result = EvalResult(
            split=suite.name,
            scores=scores,
            generation={
                name: record
                for name, task in suite.tasks.items()
                if (record := generation_record(task, self.lm.max_gen_toks)) is not None
            },
            settings={**self._settings(suite), "decoding": self._decoding(*paths)},
            seconds=seconds,
            forward_seconds=self.timer.seconds,
            samples=out.get("samples", {}),
        )
        if suite.selections is not None:
            result.fitness, result.fitness_stderr = weighted_mean(scores)
            result.rows = {
                s.task: [float(v) for v in metric_values(suite.tasks[s.task])[(s.metric, s.filter)]]
                for s in suite.selections
            }
        return result

    def _settings(self, suite: TaskSuite) -> dict[str, Any]:
        s = suite.settings
        return {
            "limit": suite.limit,
            "rows": {k: [v[0], v[-1] + 1] for k, v in suite.samples.items()}
            if suite.samples
            else None,
            "num_fewshot": {n: t.get_config("num_fewshot") for n, t in suite.tasks.items()},
            "batch_size": self.batch_size,
            "batch_probe": asdict(self.lm.probe) if self.lm.probe else None,
            "apply_chat_template": s.apply_chat_template,
            "fewshot_as_multiturn": s.multiturn,
            "system_instruction": s.system_instruction,
            "bootstrap_iters": s.bootstrap_iters,
            "fewshot_seed": s.fewshot_seed,
            "device": str(self.lm.device),
            "dtype": str(self.lm.model.dtype).removeprefix("torch."),
            "lm_eval": _LM_EVAL_VERSION,
        }

    def _decoding(self, greedy_before: int, generate_before: int) -> str | None:
        """How this run's generations were decoded: 'fast greedy' (evals/greedy.py), or
        'generate()' and why the fast path refused; None when nothing was generated."""
        greedy = self.lm.greedy_batches - greedy_before
        generate = self.lm.generate_batches - generate_before
        if generate:
            share = f"{generate} of {greedy + generate} batches"
            return f"generate() for {share}: {self.lm.greedy_refusal}"
        return "fast greedy" if greedy else None

    def close(self) -> None:
        self.timer.remove()


def _scores(out: dict[str, Any], suite: TaskSuite) -> list[Score]:
    results, counts = out["results"], out.get("n-samples", {})
    keys = (
        [(s.task, s.metric, s.filter, s.weight) for s in suite.selections]
        if suite.selections is not None
        else [
            (task, *key.split(",", 1), None)
            for task, metrics in results.items()
            for key in metrics
            if "," in key and "_stderr," not in key
        ]
    )
    scores = []
    for task, metric, filter_name, weight in keys:
        row = results[task]
        key = f"{metric},{filter_name}"
        if key not in row:
            raise EvalError(
                f"task {task} ran but reported no {key} (it reported "
                f"{', '.join(k for k in row if ',' in k)}); fix the metric name"
            )
        value = row[key]
        if not isinstance(value, int | float):
            if weight is not None:  # a fitness entry must be a number
                raise EvalError(f"task {task} reported {key} = {value!r}, not a number")
            continue
        stderr = row.get(f"{metric}_stderr,{filter_name}")
        if not isinstance(stderr, int | float):
            stderr = _mean_stderr(suite, task, metric, filter_name)
        n = counts.get(task, {}).get("effective", row.get("sample_len", 0))
        scores.append(Score(task, metric, filter_name, float(value), stderr, int(n), weight))
    return scores


def _mean_stderr(suite: TaskSuite, task: str, metric: str, filter_name: str) -> float | None:
    """lm-eval's closed-form stderr for mean metrics, which it skips when bootstrap_iters is 0."""
    task_obj = suite.tasks.get(task)
    if task_obj is None or task_obj.aggregation().get(metric) is not mean:
        return None
    values = metric_values(task_obj).get((metric, filter_name), [])
    return float(mean_stderr(values)) if len(values) > 1 else None
