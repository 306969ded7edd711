"""Optimizers behind one ask/tell interface: Nevergrad (CMA-ES by default, any registered
optimizer by name) and Optuna samplers. Both work on the journal, so a resumed search continues
as if it had never stopped:

- Nevergrad: the optimizer is rebuilt with the same seed and the finished trials are replayed
  in order (each asked candidate must equal the stored genome; its stored result is told).
- Optuna: samplers read their history from the study; trials a killed process had asked but
  not told are evaluated first. Each trial gets a sampler seeded from the search seed and its
  trial number, so the sequence does not depend on where the run was interrupted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from evomerge.search.config import OptimizerSpec
from evomerge.search.errors import SearchError
from evomerge.search.journal import Journal
from evomerge.search.records import Outcome, TrialRecord
from evomerge.search.space import GeneSpace

WORST_LOSS = 1e9  # what a failed candidate tells a minimizing optimizer (CMA-ES ranks only)
OPTUNA_SAMPLERS = (
    "CmaEsSampler",
    "TPESampler",
    "NSGAIISampler",
    "NSGAIIISampler",
    "RandomSampler",
    "QMCSampler",
    "GPSampler",
)
MULTI_OBJECTIVE = {"NSGAIISampler", "NSGAIIISampler"}


@dataclass
class Proposal:
    number: int  # the trial number it gets (or has) in the study
    generation: int
    genome: list[float]
    handle: Any = None  # the optimizer's own object (a Nevergrad candidate, an Optuna trial)
    done: TrialRecord | None = None  # already evaluated in an earlier run: tell, do not evaluate


class Optimizer(Protocol):
    """What the search loop asks of an optimizer (both backends implement it). One generation:

        n = opt.next_batch()                 # how many to ask now (the rest of a generation)
        proposals = opt.ask(n)               # proposals already `done` in an earlier run are
        for p, outcome in evaluated:         #   not evaluated again
            opt.record(p, outcome, recipe)   # into the journal, as each finishes
        for p in proposals:
            opt.tell(p, outcome)             # the whole generation, in proposal order

    `proposed` counts the trials asked so far, resumed ones included (the budget's measure).
    """

    @property
    def proposed(self) -> int: ...

    def next_batch(self) -> int: ...

    def ask(self, n: int) -> list[Proposal]: ...

    def record(self, proposal: Proposal, outcome: Outcome, recipe: str) -> None: ...

    def tell(self, proposal: Proposal, outcome: Outcome) -> None: ...


def default_population(n_genes: int) -> int:
    """CMA-ES's default population size, 4 + floor(3 ln n)."""
    return 4 + int(3 * math.log(max(n_genes, 1)))


def check_optimizer(spec: OptimizerSpec, objectives: int | None = None) -> None:
    """Fail on an unknown optimizer before anything is loaded (`objectives`: the number of
    fitness tasks, which some strategies need several of)."""
    from evomerge.search.breeding import STRATEGIES, check_strategy

    if spec.name in STRATEGIES:
        check_strategy(spec, objectives)
        return
    if spec.backend == "nevergrad":
        import nevergrad as ng

        if spec.name not in ng.optimizers.registry:
            import difflib

            close = difflib.get_close_matches(spec.name, list(ng.optimizers.registry), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SearchError(
                f"optimizer.name: {spec.name!r} is not a Nevergrad optimizer{hint} "
                "(e.g. CMA, NGOpt, DE, TwoPointsDE, PSO, RandomSearch) or a breeding "
                "strategy (natural_niches, cycle_qd)"
            )
        if spec.options and spec.name != "CMA":
            raise SearchError(
                "optimizer.options: only CMA takes options with the nevergrad backend "
                "(they go to nevergrad.families.ParametrizedCMA)"
            )
        _check_options(spec.options, ng.families.ParametrizedCMA, "Nevergrad's CMA")
    elif spec.name not in OPTUNA_SAMPLERS:
        raise SearchError(
            f"optimizer.name: {spec.name!r} is not an Optuna sampler; use one of "
            f"{', '.join(OPTUNA_SAMPLERS)}"
        )
    else:
        import optuna

        _check_options(spec.options, getattr(optuna.samplers, spec.name), spec.name)


def _check_options(options: dict, target: Any, what: str) -> None:
    """Every key of `optimizer.options` is a keyword `target` takes (before a search starts)."""
    import difflib
    import inspect

    accepted = set(inspect.signature(target).parameters) - {"self", "seed", "args", "kwargs"}
    for key in sorted(options):
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SearchError(
                f"optimizer.options.{key}: not an option of {what}{hint}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )


class NevergradOptimizer:
    def __init__(
        self,
        space: GeneSpace,
        spec: OptimizerSpec,
        journal: Journal,
        *,
        budget: int | None,
        seed: int,
    ):
        import nevergrad as ng

        self.space, self.journal = space, journal
        if journal.live_owners():
            raise SearchError(
                "another searcher is working on this study; Nevergrad keeps its state in one "
                "process: share a study with optimizer backend optuna, or wait for it to stop"
            )
        self.population = spec.population or default_population(len(space))
        unit_init = np.array(space.to_unit(space.init()))
        unit_sigma = np.array([g.sigma / (g.high - g.low) for g in space.genes])
        parametrization = ng.p.Array(init=unit_init, lower=0.0, upper=1.0)
        parametrization.set_mutation(sigma=unit_sigma)
        parametrization.random_state.seed(seed)
        if spec.name == "CMA":
            options = {"popsize": self.population, **spec.options}
            factory = ng.families.ParametrizedCMA(**options)
        else:
            factory = ng.optimizers.registry[spec.name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "bounds narrower than 3 sigma" and the like
            self.optimizer = factory(parametrization, budget=budget, num_workers=self.population)
        self.replay = journal.finished()
        self.count = 0

    @property
    def proposed(self) -> int:
        """Candidates proposed so far, replayed ones included."""
        return self.count

    def next_batch(self) -> int:
        """How many to ask now: the rest of the current generation."""
        return self.population - self.count % self.population

    def ask(self, n: int) -> list[Proposal]:
        generation = self.count // self.population
        proposals = []
        for _ in range(n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cma's "orphanated injected solution" notice
                candidate = self.optimizer.ask()
            genome = self.space.from_unit(candidate.value)
            done = None
            if self.count < len(self.replay):
                done = self.replay[self.count]
                if not np.allclose(done.genome, genome, rtol=0, atol=1e-9):
                    raise SearchError(
                        f"resume: trial {done.number} in the study differs from what the "
                        "optimizer proposes now (another nevergrad version or a changed "
                        "recipe?); start a new study"
                    )
            proposals.append(Proposal(self.count, generation, genome, candidate, done))
            self.count += 1
        return proposals

    def record(self, proposal: Proposal, outcome: Outcome, recipe: str) -> None:
        self.journal.add(proposal.generation, proposal.genome, outcome, recipe)

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        loss = WORST_LOSS if outcome.failed else -float(outcome.fitness)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.optimizer.tell(proposal.handle, loss)


def per_trial_seed(seed: int, number: int) -> int:
    return (seed * 1_000_003 + number) % 2**32


def seeded_per_trial(make, seed: int):
    """An Optuna sampler that hands each trial to a fresh sampler seeded from the search seed
    and the trial's number: what a trial draws does not depend on which process asks it or on
    where an earlier run stopped (state such as CMA-ES's lives in the study, not the sampler)."""
    from optuna.samplers import BaseSampler

    class PerTrialSeed(BaseSampler):
        def __init__(self) -> None:
            self.inner = make(seed)

        def before_trial(self, study, trial) -> None:
            self.inner = make(per_trial_seed(seed, trial.number))
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

    return PerTrialSeed()


class OptunaOptimizer:
    def __init__(self, space: GeneSpace, spec: OptimizerSpec, journal: Journal, *, seed: int):
        self.space, self.journal, self.spec, self.seed = space, journal, spec, seed
        self.population = spec.population or default_population(len(space))
        self.pending = journal.orphaned()
        journal.study.sampler = seeded_per_trial(self._sampler, seed)

    @property
    def proposed(self) -> int:
        """Trials asked so far (by any process), less the orphans this one will evaluate."""
        return self.journal.n_trials() - len(self.pending)

    def next_batch(self) -> int:
        """How many to ask now: the rest of the current generation, so that a resumed run asks
        each trial with the same trials finished before it as an uninterrupted one."""
        position = self.pending[0].number if self.pending else self.journal.n_trials()
        return self.population - position % self.population

    def _sampler(self, seed: int):
        import optuna

        cls = getattr(optuna.samplers, self.spec.name)
        options = dict(self.spec.options)
        if self.spec.name == "CmaEsSampler":
            options.setdefault("popsize", self.population)
        elif self.spec.name in MULTI_OBJECTIVE:
            options.setdefault("population_size", self.population)
        try:
            return cls(seed=seed, **options)
        except TypeError as exc:
            raise SearchError(f"optimizer.options: {self.spec.name}: {exc}") from None

    def ask(self, n: int) -> list[Proposal]:
        proposals = []
        for _ in range(n):
            pending = self.pending.pop(0) if self.pending else None
            trial = self.journal.study.ask() if pending is None else self._reopen(pending)
            trial.set_user_attr("owner", self.journal.owner)
            genome = [trial.suggest_float(g.name, g.low, g.high) for g in self.space.genes]
            generation = trial.number // self.population
            proposals.append(Proposal(trial.number, generation, genome, trial))
        return proposals

    def _reopen(self, frozen):
        """A trial an earlier process asked but never told, to evaluate now. One killed while
        its parameters were being drawn gets the rest drawn as that process would have: the
        sampler reseeded for the trial, its random stream advanced past the parameters
        already stored, so the trial holds what an uninterrupted run draws. (Stored parameters
        are returned as stored by `suggest_float`.)"""
        import optuna

        study = self.journal.study
        trial = optuna.trial.Trial(study, frozen._trial_id)  # reseeds the sampler for it
        if all(g.name in frozen.params for g in self.space.genes):
            return trial
        for gene in self.space.genes:
            if gene.name not in frozen.params:
                break
            if gene.name not in trial.relative_params:  # drawn independently: replay the draw
                distribution = self.journal.distributions[gene.name]
                study.sampler.sample_independent(study, frozen, gene.name, distribution)
        return trial

    def record(self, proposal: Proposal, outcome: Outcome, recipe: str) -> None:
        from optuna.trial import TrialState

        trial = proposal.handle
        for key, value in self.journal.attrs(proposal.generation, outcome, recipe).items():
            trial.set_user_attr(key, value)
        values = self.journal.values(outcome)
        if values is None:
            self.journal.study.tell(trial, state=TrialState.FAIL)
        else:
            self.journal.study.tell(trial, values)

    def tell(self, proposal: Proposal, outcome: Outcome) -> None:
        """Optuna samplers learn from the study itself; `record` already told it."""


def make_optimizer(
    space: GeneSpace, spec: OptimizerSpec, journal: Journal, *, budget: int | None, seed: int
) -> Optimizer:
    check_optimizer(spec)
    from evomerge.search.breeding import STRATEGIES, make_strategy

    if spec.name in STRATEGIES:
        return make_strategy(space, spec, journal, budget=budget, seed=seed)
    if spec.backend == "nevergrad":
        return NevergradOptimizer(space, spec, journal, budget=budget, seed=seed)
    return OptunaOptimizer(space, spec, journal, seed=seed)
