"""Strategies that breed from their offspring, over the parameter-space genome: every candidate is
still a mergekit recipe.

- `natural_niches` (M2N2, Abrantes et al., GECCO 2025): an archive of genomes with their
  per-row scores on the fitness rows. A row that many members solve is a shared resource worth
  little; fitness is what a member earns from the rows (resource competition). Parent A is
  drawn by fitness, parent B by attraction (strong where A is weak); the child mixes them with
  a weight w before a split point at a layer-group boundary and 1 - w after it, and replaces
  the archive's weakest member unless it is the weakest itself.
- `cycle_qd` (CycleQD, Kuroki et al., ICLR 2025): one archive per fitness task, a grid over the
  other tasks' scores; each generation one task is the quality (cycling), two of its archive's
  elites are crossed and mutated, and the child enters every archive where it fills an empty
  cell or beats the cell's elite. The last candidate of the budget is the elites' merge.

Both work in the unit cube of the genome (`GeneSpace.to_unit`), are deterministic given the seed
and the outcomes told, and are rebuilt on `--resume` by replaying the study's trials in order
(each replayed proposal must equal the stored genome), as the Nevergrad optimizers are.
A generation is `population` children bred from the archive as it stood when the generation
began, so its candidates can be evaluated in parallel (Ray).

For linear and task-arithmetic merges, mixing two genomes of weights is exactly mixing the two
merges (the merge is linear in its weights), so the split-point crossover is M2N2's weight-
space crossover. For densities and other non-linear parameters it mixes the recipes' numbers,
not the models: a child's density is between its parents', not the density of a mixed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.search.config import OptimizerSpec
from evomerge.search.errors import SearchError
from evomerge.search.journal import Journal
from evomerge.search.records import Outcome
from evomerge.search.space import GeneSpace

STRATEGIES = ("natural_niches", "cycle_qd")
OPTIONS = {
    "natural_niches": {"archive": 20, "alpha": 1.0, "warmup": None, "mutation": 0.0},
    "cycle_qd": {"bins": 5, "warmup": None, "mutation": 0.05},
}
EPS = 1e-8


def check_strategy(spec: OptimizerSpec, objectives: int | None = None) -> None:
    accepted = OPTIONS[spec.name]
    for key, value in spec.options.items():
        if key not in accepted:
            raise SearchError(
                f"optimizer.options.{key}: not an option of {spec.name}; accepted: "
                f"{', '.join(sorted(accepted))}"
            )
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SearchError(f"optimizer.options.{key}: {value!r} is not a number")
        if value < 0:
            raise SearchError(f"optimizer.options.{key}: {value} must not be negative")
    if spec.name == "natural_niches" and int(spec.options.get("archive", 20)) < 2:
        raise SearchError("optimizer.options.archive: an archive holds at least 2 genomes")
    if spec.name == "cycle_qd":
        if int(spec.options.get("bins", 5)) < 1:
            raise SearchError("optimizer.options.bins: at least 1 bin per axis")
        if objectives is not None and objectives < 2:
            raise SearchError(
                "optimizer: cycle_qd needs at least two fitness tasks (one archive per task, the "
                "others' scores as its grid); add a task or use natural_niches"
            )


# --- operators (pure functions of arrays, tested against hand-computed cases) -------------------


def competition_fitness(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """M2N2's resource competition over a (members x rows) score matrix:
    f_i = sum_j c_j s_ij / (z_j^alpha + eps), z_j = sum_k s_kj (1 where 0), c_j = max_k s_kj."""
    z = scores.sum(axis=0)
    z = np.where(z == 0, 1.0, z)
    capacity = scores.max(axis=0)
    return (scores * (capacity / (z**alpha + EPS))).sum(axis=1)


def attraction(scores: np.ndarray, a: int, alpha: float = 1.0) -> np.ndarray:
    """How much each member would add to member `a`: g(a, b) = sum_j c_j / (z_j^alpha + eps) *
    max(s_bj - s_aj, 0)."""
    z = scores.sum(axis=0)
    z = np.where(z == 0, 1.0, z)
    capacity = scores.max(axis=0)
    gain = np.clip(scores - scores[a], 0.0, None)
    return (gain * (capacity / (z**alpha + EPS))).sum(axis=1)


def split_crossover(
    a: np.ndarray, b: np.ndarray, groups: np.ndarray, split: int, w: float
) -> np.ndarray:
    """w * a + (1 - w) * b for genes whose layer group lies before `split`, (1 - w) * a + w * b
    for the others (`groups`: each gene's layer-group index)."""
    before = groups < split
    return np.where(before, w * a + (1 - w) * b, (1 - w) * a + w * b)


def replace_weakest(
    scores: np.ndarray, child: np.ndarray, alpha: float = 1.0
) -> int | None:
    """Which member the child replaces (competition fitness over archive + child): the
    weakest, unless the child is the weakest (None). Ties go to the older member."""
    fitness = competition_fitness(np.vstack([scores, child]), alpha)
    weakest = int(np.argmin(fitness))
    return None if weakest == len(scores) else weakest


def cell_of(behaviour: Sequence[float], low: Sequence[float], high: Sequence[float],
            bins: int) -> tuple[int, ...]:  # fmt: skip
    """The grid cell of a behaviour vector: each axis cut into `bins` equal bins over
    [low, high]; values outside go to the first or last bin."""
    cell = []
    for value, lo, hi in zip(behaviour, low, high, strict=True):
        span = hi - lo
        k = int((value - lo) / span * bins) if span > 0 else 0
        cell.append(min(max(k, 0), bins - 1))
    return tuple(cell)


def insert_elite(
    archive: dict[tuple[int, ...], tuple[float, int]], cell: tuple[int, ...], quality: float,
    member: int,
) -> bool:  # fmt: skip
    """Put `member` in `cell` if the cell is empty or its elite's quality is lower."""
    held = archive.get(cell)
    if held is not None and held[0] >= quality:
        return False
    archive[cell] = (quality, member)
    return True


# --- the optimizer ---------------------------------------------------------------------------


@dataclass
class _Member:
    unit: np.ndarray
    rows: np.ndarray  # per-row scores, in fitness-row order, scaled by the task weights
    scores: dict[str, float] = field(default_factory=dict)


class BreedingOptimizer:
    """The ask/tell interface the loop drives (see `optimizers.Optimizer`); subclasses say how
    a generation's children are bred (`_breed`) and how a told outcome enters the archive
    (`_admit`). Warm-up proposals come first: the sources, the uniform merge, random genomes."""

    def __init__(
        self,
        space: GeneSpace,
        spec: OptimizerSpec,
        journal: Journal,
        *,
        budget: int | None,
        seed: int,
        objectives: list[str],
    ):
        from evomerge.search.optimizers import default_population

        self.space, self.journal, self.budget = space, journal, budget
        self.objectives = objectives
        self.options = {**OPTIONS[spec.name], **spec.options}
        self.population = spec.population or default_population(len(space))
        self.rng = np.random.default_rng([seed, 8])
        self.members: list[_Member] = []
        self.replay = journal.finished()
        self.count = 0
        self.groups = _layer_groups(space)
        warm = self.options.get("warmup")
        self.warmup = int(warm) if warm is not None else self._default_warmup()
        self.seeds = [np.array(space.to_unit(g)) for g in _seed_genomes(space)]

    def _default_warmup(self) -> int:
        return self.population

    @property
    def proposed(self) -> int:
        return self.count

    def next_batch(self) -> int:
        return self.population - self.count % self.population

    def ask(self, n: int) -> list:
        from evomerge.search.optimizers import Proposal

        generation = self.count // self.population
        units = self._breed(n, generation)
        proposals = []
        for unit in units:
            genome = self.space.from_unit(unit)
            done = None
            if self.count < len(self.replay):
                done = self.replay[self.count]
                if not np.allclose(done.genome, genome, rtol=0, atol=1e-9):
                    raise SearchError(
                        f"resume: trial {done.number} in the study differs from what "
                        f"{type(self).__name__} proposes now (a changed recipe?); start a new study"
                    )
            proposals.append(Proposal(self.count, generation, genome, np.array(unit), done))
            self.count += 1
        return proposals

    def _breed(self, n: int, generation: int) -> list[np.ndarray]:
        units = []
        for k in range(n):
            index = self.count + k
            if index < self.warmup or len(self.members) < 2:
                units.append(self._warm(index))
            else:
                units.append(self._child(generation))
        return units

    def _warm(self, index: int) -> np.ndarray:
        if index < len(self.seeds):
            return self.seeds[index]
        return self.rng.random(len(self.space))

    def _child(self, generation: int) -> np.ndarray:
        raise NotImplementedError

    def _mutate(self, unit: np.ndarray) -> np.ndarray:
        sigma = float(self.options.get("mutation") or 0.0)
        if sigma > 0:
            unit = unit + self.rng.normal(0.0, sigma, size=unit.shape)
        return np.clip(unit, 0.0, 1.0)

    def record(self, proposal: Any, outcome: Outcome, recipe: str) -> None:
        self.journal.add(proposal.generation, proposal.genome, outcome, recipe)

    def tell(self, proposal: Any, outcome: Outcome) -> None:
        if outcome.failed:
            return
        rows = _row_vector(outcome, self.journal)
        self._admit(_Member(np.asarray(proposal.handle), rows, dict(outcome.scores)))

    def _admit(self, member: _Member) -> None:
        raise NotImplementedError


class NaturalNiches(BreedingOptimizer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.groups.max() == 0:  # one layer group: split between any two genes instead
            self.groups = np.arange(len(self.space))

    def _default_warmup(self) -> int:
        return int(self.options["archive"])

    def _admit(self, member: _Member) -> None:
        if len(self.members) < int(self.options["archive"]):
            self.members.append(member)
            return
        scores = np.vstack([m.rows for m in self.members])
        if member.rows.shape != scores.shape[1:]:
            raise SearchError(
                "natural_niches: members were scored on different rows; it needs every "
                "candidate scored on the same rows (fitness mode full)"
            )
        weakest = replace_weakest(scores, member.rows, float(self.options["alpha"]))
        if weakest is not None:
            self.members[weakest] = member

    def _child(self, generation: int) -> np.ndarray:
        alpha = float(self.options["alpha"])
        scores = np.vstack([m.rows for m in self.members])
        fitness = competition_fitness(scores, alpha)
        a = int(self.rng.choice(len(self.members), p=_probabilities(fitness)))
        pull = attraction(scores, a, alpha)
        pull[a] = 0.0
        if pull.sum() <= 0:  # nobody is stronger anywhere: any other member
            pull = np.ones(len(self.members))
            pull[a] = 0.0
        b = int(self.rng.choice(len(self.members), p=_probabilities(pull)))
        split = int(self.rng.integers(0, self.groups.max() + 1))
        w = float(self.rng.random())
        child = split_crossover(self.members[a].unit, self.members[b].unit, self.groups, split, w)
        return self._mutate(child)


class CycleQD(BreedingOptimizer):
    """Archives keyed by task: cell -> (quality, member index)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.archives: dict[str, dict[tuple[int, ...], tuple[float, int]]] = {
            task: {} for task in self.objectives
        }
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def _bounds(self) -> None:
        """Each task's behaviour range, from the warm-up (as CycleQD's 85% of the weakest to
        115% of the strongest seed model)."""
        for task in self.objectives:
            values = [m.scores[task] for m in self.members]
            self.low[task] = 0.85 * min(values)
            self.high[task] = max(1.15 * max(values), self.low[task] + EPS)

    def _admit(self, member: _Member) -> None:
        self.members.append(member)
        if len(self.members) < self.warmup:
            return
        if not self.low:
            self._bounds()
            for index in range(len(self.members)):
                self._place(index)
        else:
            self._place(len(self.members) - 1)

    def _place(self, index: int) -> None:
        member = self.members[index]
        bins = int(self.options["bins"])
        for task, archive in self.archives.items():
            others = [t for t in self.objectives if t != task]
            cell = cell_of(
                [member.scores[t] for t in others],
                [self.low[t] for t in others],
                [self.high[t] for t in others],
                bins,
            )
            insert_elite(archive, cell, member.scores[task], index)

    def _breed(self, n: int, generation: int) -> list[np.ndarray]:
        units = super()._breed(n, generation)
        if self.budget is not None and self.count + n == self.budget and self.low:
            units[-1] = self._elite_merge()  # the last candidate: the elites' merge
        return units

    def _child(self, generation: int) -> np.ndarray:
        task = self.objectives[generation % len(self.objectives)]
        elites = [index for _, index in self.archives[task].values()]
        if len(elites) < 2:
            elites = list(range(len(self.members)))
        weights = self._elite_weights(task, elites)
        a, b = self.rng.choice(len(elites), size=2, replace=False, p=weights)
        w = float(self.rng.random())
        child = w * self.members[elites[a]].unit + (1 - w) * self.members[elites[b]].unit
        return self._mutate(child)

    def _elite_weights(self, task: str, elites: list[int]) -> np.ndarray:
        """CycleQD's elite sampling: the product over the quality and behaviour scores of
        0.5 + 0.8 * (min-max normalized score among the elites)."""
        weight = np.ones(len(elites))
        for t in self.objectives:
            values = np.array([self.members[i].scores[t] for i in elites])
            span = values.max() - values.min()
            normalized = (values - values.min()) / span if span > 0 else np.zeros_like(values)
            weight *= 0.5 + 0.8 * normalized
        return weight / weight.sum()

    def _elite_merge(self) -> np.ndarray:
        """The best elite of each archive, mixed with softmax weights of their qualities."""
        best = []
        for archive in self.archives.values():
            if archive:
                quality, index = max(archive.values())
                best.append((quality, index))
        qualities = np.array([q for q, _ in best])
        beta = np.exp(qualities - qualities.max())
        beta /= beta.sum()
        return np.clip(sum(b * self.members[i].unit for b, (_, i) in zip(beta, best,
                                                                          strict=True)), 0, 1)


def _probabilities(weights: np.ndarray) -> np.ndarray:
    weights = np.clip(weights, 0.0, None)
    total = weights.sum()
    if total <= 0:
        return np.full(len(weights), 1.0 / len(weights))
    return weights / total


def _layer_groups(space: GeneSpace) -> np.ndarray:
    """Each gene's layer-group index (genes for every layer count as group 0)."""
    starts = sorted({g.layers[0] for g in space.genes if g.layers is not None})
    index = {start: k for k, start in enumerate(starts)}
    return np.array([0 if g.layers is None else index[g.layers[0]] for g in space.genes])


def _seed_genomes(space: GeneSpace) -> list[list[float]]:
    """The warm-up's first genomes: each searched model alone (its weights 1, the others' 0,
    clipped to the bounds; other parameters at their start), then the uniform merge."""
    genomes = []
    models = list(dict.fromkeys(g.model for g in space.genes if g.model is not None))
    if any(g.param == "weight" for g in space.genes):
        for model in models:
            genome = []
            for g in space.genes:
                value = g.init
                if g.param == "weight":
                    value = 1.0 if g.model == model else 0.0
                genome.append(min(max(value, g.low), g.high))
            genomes.append(genome)
    genomes.append(space.init())
    return genomes


def _row_vector(outcome: Outcome, journal: Journal) -> np.ndarray:
    """The outcome's per-row values, task by task in the study's objective order, each scaled
    so that the rows of a task weigh what the task weighs in the fitness."""
    if not outcome.row_values:
        return np.zeros(0)
    parts = []
    for task in journal.objectives:
        values = np.asarray(outcome.row_values.get(task, []), dtype=float)
        if len(values):
            parts.append(values / len(values))
    return np.concatenate(parts) if parts else np.zeros(0)


def make_strategy(
    space: GeneSpace, spec: OptimizerSpec, journal: Journal, *, budget: int | None, seed: int
) -> BreedingOptimizer:
    check_strategy(spec, len(journal.objectives))
    cls = NaturalNiches if spec.name == "natural_niches" else CycleQD
    return cls(space, spec, journal, budget=budget, seed=seed, objectives=journal.objectives)

