"""Executors: a batch of candidate recipes in, one Outcome per candidate out (in order).

The serial executor keeps the source tensors resident on one device and materializes every
candidate in place into one preallocated model, which lm-eval scores from memory: no disk.
A candidate that fails (non-finite weights, out of memory, an evaluation error) comes back as
a failed Outcome with its error; the search records it and goes on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from evomerge.evals.results import EvalResult
from evomerge.evals.suite import TaskSuite
from evomerge.merge.errors import first_line
from evomerge.merge.recipe import Recipe
from evomerge.search.records import Outcome


class Executor(Protocol):
    def evaluate(self, recipes: Sequence[Recipe]) -> Iterator[Outcome]: ...

    def score(self, recipe: Recipe, split: str) -> EvalResult: ...

    def close(self) -> None: ...


class CandidateError(Exception):
    """A candidate that cannot be scored (its merge is broken, not the search)."""


def outcome_of(result: EvalResult, seconds: dict[str, float]) -> Outcome:
    return Outcome(
        fitness=result.fitness,
        fitness_stderr=result.fitness_stderr,
        scores={s.task: s.value for s in result.scores},
        stderrs={s.task: s.stderr for s in result.scores},
        seconds=seconds,
        decoding=result.settings.get("decoding"),
    )


class SerialExecutor:
    """Candidates one after another in this process, on one device."""

    def __init__(
        self,
        first: Recipe,
        suites: dict[str, TaskSuite],
        *,
        device: str = "auto",
        seed: int = 0,
        allow_pickle: bool = False,
    ):
        from evomerge.evals.evaluator import Evaluator
        from evomerge.merge.resident import ResidentMerger

        self.merger = ResidentMerger(first, device=device, seed=seed, allow_pickle=allow_pickle)
        self.model = self.merger.build_model()
        self.evaluator = Evaluator(self.model, self.merger.tokenizer(), suites)

    def evaluate(self, recipes: Sequence[Recipe]) -> Iterator[Outcome]:
        for recipe in recipes:
            yield self._one(recipe)

    def _one(self, recipe: Recipe) -> Outcome:
        started = time.perf_counter()
        seconds: dict[str, float] = {}
        try:
            self._materialize(recipe)
            seconds["materialize"] = time.perf_counter() - started
            result = self.evaluator.score("fitness")
        except Exception as exc:  # any failure of one candidate is recorded, not raised
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            seconds.setdefault("materialize", time.perf_counter() - started)
            return Outcome(fitness=None, error=first_line(exc, with_type=True), seconds=seconds)
        seconds["evaluate"] = time.perf_counter() - started - seconds["materialize"]
        return outcome_of(result, seconds)

    def _materialize(self, recipe: Recipe) -> None:
        self.merger.materialize(self.model, recipe)
        for name, param in self.model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise CandidateError(f"the merge has non-finite values in {name}")

    def score(self, recipe: Recipe, split: str) -> EvalResult:
        """One recipe on one split (the uniform and the best merge on held-out data)."""
        self._materialize(recipe)
        return self.evaluator.score(split)

    def close(self) -> None:
        self.evaluator.close()


class StackedExecutor(SerialExecutor):
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
        seed: int = 0,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.evals.evaluator import Evaluator
        from evomerge.merge.compute import resolve_device
        from evomerge.merge.refs import resolve_model_dir
        from evomerge.merge.stacking import StackedModel

        del seed  # paths are deterministic
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
        self.model = self.stack.model
        tokenizer = AutoTokenizer.from_pretrained(folders[base])
        self.evaluator = Evaluator(self.model, tokenizer, suites)

    def _materialize(self, path: list) -> None:
        self.stack.set_path(path)
