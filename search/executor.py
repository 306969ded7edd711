"""Executors: a batch of candidates in, one Outcome per candidate out (in order).

Each executor is built by the space whose candidates it runs (`GeneSpace.make_executor`): a
parameter-space candidate is a recipe, materialized in place into one preallocated model whose
source tensors stay resident (`SerialExecutor`, or `RayExecutor` for several workers); a
data-flow candidate is a layer path through one stacked model (`StackedExecutor`). lm-eval scores
the model from memory: no disk. A candidate that fails (non-finite weights, out of memory, an
evaluation error) comes back as a failed Outcome with its error; the search records it and goes
on. The source models are scored through the executor too (`score_source`), so they run where
the candidates run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from evomerge.evals.results import EvalResult
from evomerge.evals.suite import TaskSuite
from evomerge.merge.errors import MergeError, first_line
from evomerge.merge.recipe import Recipe
from evomerge.search.records import Outcome


class Executor(Protocol):
    def run(self, candidate: Any, ticket: Any) -> Outcome:
        """One candidate, materialized, then scored as its ticket says: the outcome with its
        per-row values and timings (a failed one says why)."""
        ...

    def evaluate(self, candidates: Sequence[Any], tickets: Iterable[Any]) -> Iterator[Outcome]:
        """One Outcome per candidate, in order, as each finishes. `tickets` (one per candidate)
        say which rows to score and how (`evomerge.search.fitness`); the serial executors take
        each ticket just before its candidate runs."""
        ...

    def score(self, candidate: Any, split: str) -> EvalResult:
        """One candidate on one split (the reference merges at the end of a search)."""
        ...

    def score_source(self, model: str) -> dict[str, EvalResult]:
        """A source model alone, on every prepared split."""
        ...

    def score_recipe(self, recipe: Recipe, splits: Sequence[str]) -> dict[str, EvalResult]:
        """A merge recipe outside the search's space (a baseline) on these splits."""
        ...

    def close(self) -> None: ...


class CandidateError(Exception):
    """A candidate that cannot be scored (its merge is broken, not the search)."""


def score_model(
    model: str,
    suites: dict[str, TaskSuite],
    *,
    dtype: str | None,
    tokenizer_source: str | None,
    device: str,
    allow_pickle: bool,
) -> dict[str, EvalResult]:
    """A source model in a model of its own (its dtype or vocabulary may differ from the
    merge's), scored on every split of `suites`, then freed."""
    single = Recipe.model_validate(
        {
            "merge_method": "passthrough",
            "models": [{"model": model}],
            "dtype": dtype,
            "tokenizer_source": tokenizer_source,
        }
    )
    return score_merge(single, suites, device=device, allow_pickle=allow_pickle)


def score_merge(
    recipe: Recipe,
    suites: dict[str, TaskSuite],
    *,
    device: str,
    allow_pickle: bool,
    seed: int = 0,
) -> dict[str, EvalResult]:
    """A merge in a model of its own, scored on every split of `suites`, then freed."""
    from evomerge.evals.evaluator import Evaluator
    from evomerge.merge.resident import ResidentMerger

    merger = ResidentMerger(recipe, device=device, seed=seed, allow_pickle=allow_pickle)
    evaluator = Evaluator(merger.build_model(), merger.tokenizer(), suites)
    try:
        return {split: evaluator.score(split) for split in suites}
    finally:
        evaluator.close()


class InMemoryExecutor:
    """Candidates one after another in this process, on one model that lives in memory.
    Subclasses set `model`, `evaluator` and `source_options` and say how a candidate becomes
    the model's weights (`_materialize`)."""

    model: nn.Module
    suites: dict[str, TaskSuite]
    source_options: dict[str, Any]
    seed: int = 0  # for stochastic merges (DARE, DELLA) made outside the search's space

    def __init__(self, model: nn.Module, tokenizer: Any, suites: dict[str, TaskSuite]):
        from evomerge.evals.evaluator import Evaluator

        self.model = model
        self.suites = suites
        self.evaluator = Evaluator(model, tokenizer, suites)

    def _materialize(self, candidate: Any) -> None:
        raise NotImplementedError

    def evaluate(self, candidates: Sequence[Any], tickets: Iterable[Any]) -> Iterator[Outcome]:
        tickets = iter(tickets)
        for candidate in candidates:
            # The ticket is taken now: racing's depends on the outcomes told before it.
            yield self.run(candidate, next(tickets))

    def run(self, candidate: Any, ticket: Any) -> Outcome:
        """One candidate: materialized, then scored as its ticket says."""
        started = time.perf_counter()
        seconds: dict[str, float] = {}
        try:
            self._materialize(candidate)
            seconds["materialize"] = time.perf_counter() - started
            outcome = ticket.run(lambda rows: self.evaluator.score("fitness", rows))
            outcome.seconds = seconds
        except Exception as exc:  # any failure of one candidate is recorded, not raised
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            seconds.setdefault("materialize", time.perf_counter() - started)
            return Outcome(fitness=None, error=first_line(exc, with_type=True), seconds=seconds)
        seconds["evaluate"] = time.perf_counter() - started - seconds["materialize"]
        return outcome

    def score(self, candidate: Any, split: str) -> EvalResult:
        self._materialize(candidate)
        return self.evaluator.score(split)

    def score_source(self, model: str) -> dict[str, EvalResult]:
        return score_model(model, self.suites, **self.source_options)

    def score_recipe(self, recipe: Recipe, splits: Sequence[str]) -> dict[str, EvalResult]:
        options = {k: self.source_options[k] for k in ("device", "allow_pickle")}
        suites = {split: self.suites[split] for split in splits}
        return score_merge(recipe, suites, **options, seed=self.seed)

    def close(self) -> None:
        self.evaluator.close()


class SerialExecutor(InMemoryExecutor):
    """Parameter-space candidates (recipes), materialized in place from resident sources."""

    def __init__(
        self,
        first: Recipe,
        suites: dict[str, TaskSuite],
        *,
        device: str = "auto",
        seed: int = 0,
        allow_pickle: bool = False,
        placement: str = "device",
    ):
        from evomerge.merge.resident import ResidentMerger

        self.merger = ResidentMerger(first, device=device, seed=seed, allow_pickle=allow_pickle,
                                     placement=placement)  # fmt: skip
        super().__init__(self.merger.build_model(), self.merger.tokenizer(), suites)
        self.source_options = {
            "dtype": first.dtype,
            "tokenizer_source": first.effective_tokenizer_source,
            "device": device,
            "allow_pickle": allow_pickle,
        }

    def score_recipe(self, recipe: Recipe, splits: Sequence[str]) -> dict[str, EvalResult]:
        """In place when the resident merger can make it (the same sources, and its method or
        another task-vector method), else in a model of its own."""
        try:
            self.merger.set_recipe(recipe)
        except MergeError:
            return super().score_recipe(recipe, splits)
        return {split: self.score(recipe, split) for split in splits}

    def _materialize(self, candidate: Recipe) -> None:
        self.merger.materialize(self.model, candidate)
        for name, param in self.model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise CandidateError(f"the merge has non-finite values in {name}")


class StackedExecutor(InMemoryExecutor):
    """Data-flow candidates: the source models are loaded once and every candidate path runs
    over their shared layers in one stacked model (no weights are copied or written)."""

    def __init__(
        self,
        refs: dict[str, str],
        base: str,
        first: list,
        suites: dict[str, TaskSuite],
        *,
        device: str = "auto",
        dtype: str | None = None,
        allow_pickle: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.merge.compute import resolve_device
        from evomerge.merge.refs import resolve_model_dir
        from evomerge.merge.stacking import StackedModel

        target = resolve_device(device)
        folders = {n: resolve_model_dir(ref, allow_pickle=allow_pickle) for n, ref in refs.items()}
        models = {
            name: AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype) if dtype else "auto"
            )
            .to(target)
            .eval()
            for name, folder in folders.items()
        }
        self.stack = StackedModel(models, first, base)
        super().__init__(self.stack.model, AutoTokenizer.from_pretrained(folders[base]), suites)
        self.source_options = {
            "dtype": dtype,
            "tokenizer_source": None,
            "device": device,
            "allow_pickle": allow_pickle,
        }

    def _materialize(self, candidate: list) -> None:
        self.stack.set_path(candidate)
