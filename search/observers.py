"""What the search loop tells those who follow it. The loop (`Search._loop`) asks, evaluates,
records and tells; observers hear every outcome in trial order (resumed ones included) and every
finished generation: the fitness policy (racing's bar, IRT's calibration) and `Progress` (the
clock, the heartbeat of a shared study, the progress bar)."""

from __future__ import annotations

import time
from typing import Any

from evomerge.search.journal import Journal
from evomerge.search.records import Outcome, TrialRecord


class Observer:
    """What the search loop tells those who follow it (the fitness policy, the progress)."""

    def finished(self, proposal: Any, outcome: Outcome) -> None:
        """A trial's outcome, in trial order: evaluated now, or resumed from the study."""

    def generation_done(self, generation: int, outcomes: list[Outcome]) -> None:
        """A generation's outcomes are all in, and the optimizer has been told them."""


def notify(observers: list[Observer], event: str, *args: Any) -> None:
    for observer in observers:
        getattr(observer, event)(*args)


class Progress(Observer):
    """The search's clock (seconds summed over every run of the study, for wall-clock budgets),
    its heartbeat in a shared study, and its progress bar."""

    def __init__(
        self, journal: Journal, total: int | None, previous: list[TrialRecord], enabled: bool
    ):
        from tqdm.auto import tqdm

        self.journal = journal
        self.before = float(journal.get_attr("seconds", 0.0))
        self.started = time.monotonic()
        self.best = max((r.outcome.fitness for r in previous if not r.outcome.failed), default=None)
        self.new = 0
        journal.beat()
        self.bar = tqdm(
            total=total, initial=len(previous), unit="eval", disable=not enabled,
            dynamic_ncols=True,
        )  # fmt: skip

    @property
    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.started

    def finished(self, proposal: Any, outcome: Outcome) -> None:
        if proposal.done is None:
            self.new += 1
            self.journal.beat()
            self.bar.update(1)

    def generation_done(self, generation: int, outcomes: list[Outcome]) -> None:
        scored = [o.fitness for o in outcomes if not o.failed]
        if scored:
            self.best = max(scored + ([self.best] if self.best is not None else []))
        if self.new:
            self.journal.set_attr("seconds", self.elapsed)
            self.bar.set_postfix(
                gen=generation,
                best=f"{self.best:.4f}" if self.best is not None else "-",
                mean=f"{sum(scored) / len(scored):.4f}" if scored else "-",
                failed=sum(o.failed for o in outcomes),
                refresh=False,
            )

    def close(self) -> None:
        self.bar.close()
