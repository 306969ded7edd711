"""The data-flow space: a genome to a path through the source models' layers, with the scale
of every hop's input (Akiba et al. 2024, sec. 3.2), and that path to a mergekit passthrough
recipe and to a standard checkpoint.

Slots: the layers of all models, [A's 0..L_A-1, B's 0..L_B-1, ...], repeated `repeats` times;
slot t is on the path when its on/off gene is positive. Scales: with `scale_form: matrix`,
W[i][j] (i, j over all M = L_A + L_B + ... layers) scales the input of layer j when it follows
layer i, so M*M genes; `per_slot` gives each slot one scale; `none` keeps every scale at 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evomerge.merge.recipe import Recipe
from evomerge.merge.stacking import Hop, passthrough_recipe
from evomerge.search.config import DfsSpec, SearchRecipe
from evomerge.search.errors import SearchError
from evomerge.search.records import Gene
from evomerge.search.space import GeneSpace, short_names

if TYPE_CHECKING:
    from evomerge.evals.suite import TaskSuite
    from evomerge.search.executor import Executor


class DataFlowSpace(GeneSpace):
    def __init__(self, template: Recipe, spec: DfsSpec, layer_counts: dict[str, int | None]):
        refs = [m.model for m in template.models or []]
        if not refs:
            raise SearchError("merge: a data-flow search needs 'models' (the layers' sources)")
        base = template.base_model or refs[0]
        refs = [base, *[r for r in dict.fromkeys(refs) if r != base]]
        missing = [r for r in refs if layer_counts.get(r) is None]
        if missing:
            raise SearchError(
                f"space: the layer count of {missing[0]} is unknown (its config is not on this "
                "machine); set space.num_layers"
            )
        labels = short_names(refs)
        self.template, self.spec = template, spec
        self.names = [labels[r] for r in refs]  # hop model names; names[0] is model A
        self.refs = {labels[r]: r for r in refs}
        self.layers = [
            (name, i) for name in self.names for i in range(layer_counts[self.refs[name]] or 0)
        ]
        self.slots = [layer for _ in range(spec.repeats) for layer in self.layers]
        first_rep = len(self.layers)
        self.genes = [
            Gene(
                name=f"on.r{t // first_rep}.{name}.{layer}",
                param="on",
                model=name,
                filter=f"r{t // first_rep}",
                layers=(layer, layer + 1),
                low=-1.0,
                high=1.0,
                init=0.5 if t < first_rep and name == self.names[0] else -0.5,
                sigma=spec.on_sigma,
            )
            for t, (name, layer) in enumerate(self.slots)
        ]
        s = spec.scales
        if spec.scale_form == "matrix":
            self.genes += [
                Gene(f"scale.{a}.{i}->{b}.{j}", "scale", b, f"after {a}.{i}", (j, j + 1),
                     s.low, s.high, s.start, s.step)
                for a, i in self.layers
                for b, j in self.layers
            ]  # fmt: skip
        elif spec.scale_form == "per_slot":
            self.genes += [
                Gene(f"scale.r{t // first_rep}.{name}.{layer}", "scale", name,
                     f"r{t // first_rep}", (layer, layer + 1), s.low, s.high, s.start, s.step)
                for t, (name, layer) in enumerate(self.slots)
            ]  # fmt: skip
        self.n_slots = len(self.slots)

    def path(self, genome: Sequence[float]) -> list[Hop]:
        genome = self.check(genome)
        on = [t for t in range(self.n_slots) if genome[t] > 0]
        a = self.names[0]
        first_layer, final_layer = (a, 0), (a, self._count(a) - 1)
        steps: list[tuple[int | None, tuple[str, int]]] = [(t, self.slots[t]) for t in on]
        if self.spec.pin_ends:
            if not steps or steps[0][1] != first_layer:
                steps.insert(0, (None, first_layer))
            if steps[-1][1] != final_layer:
                steps.append((None, final_layer))
        if not steps:
            return []
        hops, previous = [], None
        for slot, layer in steps:
            scale = 1.0 if previous is None else self._scale(genome, slot, previous, layer)
            hops.append(Hop(layer[0], layer[1], scale))
            previous = layer
        return hops

    def _count(self, name: str) -> int:
        return sum(1 for n, _ in self.layers if n == name)

    def _scale(
        self, genome: list[float], slot: int | None, previous: tuple[str, int], layer: tuple
    ) -> float:
        form = self.spec.scale_form
        if form == "matrix":
            m = len(self.layers)
            i, j = self.layers.index(previous), self.layers.index(layer)
            return genome[self.n_slots + i * m + j]
        if form == "per_slot" and slot is not None:
            return genome[self.n_slots + slot]
        return 1.0

    def candidate(self, genome: Sequence[float]) -> list[Hop]:
        path = self.path(genome)
        if not path:
            raise SearchError("a path with no layers: switch some slots on or set pin_ends")
        return path

    def make_executor(self, recipe: SearchRecipe, suites: dict[str, TaskSuite]) -> Executor:
        """Paths over the sources' shared layers in one stacked model."""
        from evomerge.search.executor import StackedExecutor

        return StackedExecutor(
            self.refs,
            self.names[0],
            self.candidate(self.init()),
            suites,
            device=recipe.device,
            dtype=recipe.merge.dtype,
            allow_pickle=recipe.allow_pickle,
        )

    def to_recipe(self, genome: Sequence[float]) -> Recipe:
        """The mergekit passthrough recipe of the path (scales folded into o_proj/down_proj)."""
        data = passthrough_recipe(self.candidate(genome), self.refs, self.names[0])
        if self.template.dtype:
            data["dtype"] = self.template.dtype
        return Recipe.model_validate(data)

    def references(self, best: Sequence[float]) -> list[tuple[str, str, Any]]:
        path = self.candidate(best)
        plain = self.plain_path(len(path))
        unscaled = [Hop(h.model, h.layer) for h in path]
        return [
            (f"plain frankenmerge ({len(plain)} layers)", "uniform", plain),
            ("best path, all scales 1", "unscaled", unscaled),
            (f"best path ({len(path)} layers)", "best", path),
        ]

    def plain_path(self, length: int) -> list[Hop]:
        """The frankenmerge of `length` layers without search: evenly spaced slots, in order,
        all scales 1 (A's first and last layers at the ends)."""
        a = self.names[0]
        inner = max(length - 2, 0)
        picks = [round(k * (self.n_slots - 1) / max(inner - 1, 1)) for k in range(inner)]
        hops = [Hop(a, 0), *(Hop(*self.slots[t]) for t in picks), Hop(a, self._count(a) - 1)]
        return hops[:length] if length < 2 else hops
