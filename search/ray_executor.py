"""Candidates evaluated in parallel on Ray workers: one actor per GPU (or per CPU slot where
there is none), each holding the resident source tensors and one preallocated model, exactly
like the serial executor in its own process.

Candidates go to whichever worker is free, so no worker waits for the slowest candidate of a
generation. A worker that dies is restarted by Ray; its candidate is retried once on another
worker, and recorded as failed if that dies too. Outcomes come back in candidate order, so the
journal and the optimizer see the same sequence as with the serial executor.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from evomerge.evals.results import EvalResult
from evomerge.evals.spec import FitnessSpec
from evomerge.merge.errors import first_line
from evomerge.merge.recipe import Recipe
from evomerge.search.errors import SearchError
from evomerge.search.records import Outcome

MAX_RESTARTS = 3  # per worker; a worker that keeps dying (e.g. out of memory at load) is dropped


class _Worker:
    """A serial executor in a Ray actor process."""

    def __init__(self, first: Recipe, fitness: FitnessSpec, options: dict[str, Any]):
        import torch

        from evomerge.evals.suite import prepare_suites
        from evomerge.search.executor import SerialExecutor

        threads = options.pop("threads")
        if threads:
            torch.set_num_threads(threads)
        self.executor = SerialExecutor(first, prepare_suites(fitness), **options)

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, recipe: Recipe, ticket: Any) -> tuple[int, Outcome]:
        """The outcome, with this process's id (a restarted worker has a new one)."""
        return os.getpid(), self.executor.run(recipe, ticket)

    def score(self, recipe: Recipe, split: str) -> EvalResult:
        return self.executor.score(recipe, split)

    def score_source(self, model: str) -> dict[str, EvalResult]:
        return self.executor.score_source(model)

    def score_recipe(self, recipe: Recipe, splits: list[str]) -> dict[str, EvalResult]:
        return self.executor.score_recipe(recipe, splits)


class RayExecutor:
    def __init__(
        self,
        first: Recipe,
        fitness: FitnessSpec,
        *,
        device: str = "auto",
        seed: int = 0,
        allow_pickle: bool = False,
        workers: int | None = None,
        address: str | None = None,
        threads: int | None = None,
        placement: str = "device",
    ):
        try:
            import ray
        except ImportError:
            raise SearchError(
                "executor ray: Ray is not installed; pip install 'evomerge[ray]'"
            ) from None
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, logging_level="ERROR")
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        count = workers or gpus or max(1, int(resources.get("CPU", 1)))
        actor = ray.remote(max_restarts=MAX_RESTARTS)(_Worker).options(
            num_gpus=1 if gpus else 0, num_cpus=threads or 1
        )
        options = {
            "device": device,
            "seed": seed,
            "allow_pickle": allow_pickle,
            "placement": placement,
            "threads": threads or (None if gpus else 1),
        }
        self.actors = [actor.remote(first, fitness, dict(options)) for _ in range(count)]
        self.deaths = dict.fromkeys(range(count), 0)
        try:
            self.pids = ray.get([a.pid.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            message = first_line(exc, limit=300)
            raise SearchError(f"executor ray: a worker failed to start: {message}") from None

    def evaluate(self, recipes: Sequence[Recipe], tickets: Iterable[Any]) -> Iterator[Outcome]:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        # Minibatch and IRT tickets depend on the generation only: all can be taken now.
        plan = list(tickets)
        queue = deque(range(len(recipes)))
        idle = [w for w, deaths in self.deaths.items() if deaths <= MAX_RESTARTS]
        # object ref -> (candidate, worker); candidate None marks a probe of a restarting worker
        in_flight: dict[Any, tuple[int | None, int]] = {}
        tries = dict.fromkeys(range(len(recipes)), 0)
        done: dict[int, Outcome] = {}
        next_out = 0
        while next_out < len(recipes):
            while idle and queue:
                candidate, worker = queue.popleft(), idle.pop(0)
                tries[candidate] += 1
                ref = self.actors[worker].evaluate.remote(recipes[candidate], plan[candidate])
                in_flight[ref] = (candidate, worker)
            if not in_flight:
                raise SearchError("executor ray: every worker has died; see the Ray logs")
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            candidate, worker = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ActorUnavailableError:  # restarting: the call never ran there
                if candidate is not None:
                    tries[candidate] -= 1
                    queue.appendleft(candidate)
                time.sleep(0.2)
                in_flight[self.actors[worker].pid.remote()] = (None, worker)
                continue
            except RayActorError as exc:
                self.deaths[worker] += 1
                if candidate is not None and tries[candidate] >= 2:
                    done[candidate] = Outcome(
                        fitness=None, error=f"worker died twice: {first_line(exc, limit=300)}"
                    )
                elif candidate is not None:
                    queue.appendleft(candidate)  # retried on the next free worker
                if self.deaths[worker] <= MAX_RESTARTS:  # Ray restarts it: wait until it answers
                    in_flight[self.actors[worker].pid.remote()] = (None, worker)
                continue
            if candidate is None:
                self.pids[worker] = result
            else:
                self.pids[worker], done[candidate] = result
            idle.append(worker)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def run(self, recipe: Recipe, ticket: Any) -> Outcome:
        return next(self.evaluate([recipe], [ticket]))

    def score(self, recipe: Recipe, split: str) -> EvalResult:
        """One recipe on one split, on whichever worker answers (one may be restarting)."""
        return self._on_a_worker("score", recipe, split)

    def score_source(self, model: str) -> dict[str, EvalResult]:
        """A source model on a worker, where its weights are loaded (a GPU, under Ray)."""
        return self._on_a_worker("score_source", model)

    def score_recipe(self, recipe: Recipe, splits: Sequence[str]) -> dict[str, EvalResult]:
        """A baseline merge on a worker."""
        return self._on_a_worker("score_recipe", recipe, list(splits))

    def _refresh_pids(self, seconds: float = 60.0) -> None:
        """`pids` names the worker processes as they are now: a worker Ray restarted after the
        search's last answer from it (a death it may never have seen) reports its new pid."""
        import ray

        pending = [w for w, deaths in self.deaths.items() if deaths <= MAX_RESTARTS]
        deadline = time.monotonic() + seconds
        while pending and time.monotonic() < deadline:
            worker = pending[0]
            try:
                self.pids[worker] = ray.get(self.actors[worker].pid.remote(), timeout=5)
                pending.pop(0)
            except Exception:  # still restarting, or gone for good
                time.sleep(0.5)

    def _on_a_worker(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in range(120):
            worker = attempt % len(self.actors)
            if self.deaths[worker] > MAX_RESTARTS:
                continue
            try:
                return ray.get(getattr(self.actors[worker], method).remote(*args))
            except ActorUnavailableError:
                time.sleep(0.5)
            except RayActorError:
                self.deaths[worker] += 1
        raise SearchError(f"executor ray: no worker could run {method}; see the Ray logs")

    def close(self) -> None:
        import ray

        self._refresh_pids()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._started:
            ray.shutdown()

