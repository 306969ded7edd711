"""The parameter space: a genome (one number per gene) to a mergekit recipe and back.

Genes are laid out parameter by parameter, then model, then filter, then layer group. A gene
with a layer group becomes entries of a per-layer list (one value per layer, mergekit's
gradient form, so interpolation between equal neighbours is exact); a model's filters become
`{filter, value}` entries, with a last entry without filter for the remaining tensors.
Embeddings, the final norm and lm_head read a list's first value, as in mergekit.

Optimizers see the unit cube: `to_unit` and `from_unit` map each gene's [low, high] onto [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from evomerge.merge.methods import MergeMethod, Scope, get_method
from evomerge.merge.parameters import evaluate_setting
from evomerge.merge.recipe import Recipe
from evomerge.search.config import SearchRecipe, SpaceSpec
from evomerge.search.errors import SearchError
from evomerge.search.records import Gene

if TYPE_CHECKING:
    from evomerge.evals.suite import TaskSuite
    from evomerge.search.executor import Executor

OTHER = "*"  # the filter label of tensors that match none of the space's filters


class GeneSpace:
    """What every search space offers the loop: genes, bounds, the unit cube, and a genome's
    recipe (for the journal and `best_recipe.yaml`) and candidate (what an executor runs)."""

    genes: list[Gene]

    def __len__(self) -> int:
        return len(self.genes)

    def init(self) -> list[float]:
        """The genome of every gene at its initial value (the uniform merge when inits agree)."""
        return [g.init for g in self.genes]

    def check(self, genome: Sequence[float]) -> list[float]:
        if len(genome) != len(self.genes):
            raise SearchError(f"a genome of {len(genome)} numbers for {len(self.genes)} genes")
        out = []
        for gene, value in zip(self.genes, genome, strict=True):
            value = float(value)
            if not gene.low <= value <= gene.high:
                raise SearchError(
                    f"gene {gene.name} = {value} lies outside [{gene.low}, {gene.high}]"
                )
            out.append(value)
        return out

    def to_unit(self, genome: Sequence[float]) -> list[float]:
        return [(v - g.low) / (g.high - g.low) for g, v in zip(self.genes, genome, strict=True)]

    def from_unit(self, unit: Sequence[float]) -> list[float]:
        return [
            g.low + min(1.0, max(0.0, float(u))) * (g.high - g.low)
            for g, u in zip(self.genes, unit, strict=True)
        ]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"gene": g.name, "low": g.low, "high": g.high, "init": g.init, "sigma": g.sigma}
            for g in self.genes
        ]

    def to_recipe(self, genome: Sequence[float]) -> Recipe:
        raise NotImplementedError

    def candidate(self, genome: Sequence[float]) -> Any:
        """What the executor evaluates: the recipe itself for a parameter-space search."""
        return self.to_recipe(genome)

    def make_executor(self, recipe: SearchRecipe, suites: dict[str, TaskSuite]) -> Executor:
        """The executor that runs this space's candidates."""
        raise NotImplementedError

    def references(self, best: Sequence[float]) -> list[tuple[str, str, Any]]:
        """(name, kind, candidate) of the merges the best one is judged against, and the best."""
        return [
            ("uniform merge", "uniform", self.candidate(self.init())),
            ("best merge", "best", self.candidate(best)),
        ]

    def write_model(self, genome: Sequence[float], out: Path, **options: Any) -> None:
        """Write the genome's merge as a checkpoint in `out`."""
        from evomerge.merge.materialize import run_merge

        run_merge(self.to_recipe(genome), out, overwrite=True, **options)


def choose_placement(first: Recipe, recipe: SearchRecipe) -> str:
    """The sources' placement for a parameter-space search, from the memory plan (headers only)
    and the free memory of the device: `auto` takes the device when everything fits there, else
    the host. A placement that cannot fit is refused here, before anything loads."""
    from evomerge.merge.compute import resolve_device
    from evomerge.merge.materialize import output_config
    from evomerge.merge.memory import free_bytes, plan_memory, size
    from evomerge.merge.plan import build_plan

    device = resolve_device(recipe.device)
    plan = build_plan(first, allow_pickle=recipe.allow_pickle)
    try:
        memory = plan_memory(plan, output_config(plan), device=device)
    finally:
        for ckpt in plan.checkpoints.values():
            ckpt.close()
    free = free_bytes(device)
    if device.type == "cpu":  # one memory: placement changes nothing
        needed, placement = memory.device_bytes("device"), "device"
    elif recipe.sources == "auto":
        placement = "device" if memory.device_bytes("device") <= free else "host"
        needed = memory.device_bytes(placement)
    else:
        placement, needed = recipe.sources, memory.device_bytes(recipe.sources)
    if needed > free:
        hint = "" if placement == "host" or device.type == "cpu" else "; try sources: host"
        raise SearchError(
            f"sources: {placement}: the memory plan needs {size(needed)} on {device}, which has "
            f"{size(free)} free (evomerge search --dry-run prints the plan){hint}"
        )
    return placement


class ParameterSpace(GeneSpace):
    def __init__(self, template: Recipe, spec: SpaceSpec, num_layers: int | None):
        if not template.models:
            raise SearchError(
                "merge: a parameter-space search needs 'models' (not 'slices') in its recipe"
            )
        self.template = template
        self.method: MergeMethod = get_method(template.merge_method)
        self.num_layers = num_layers
        self.groups = self._layer_groups(spec, num_layers)
        self.models = self._searched_models(template, spec)
        self.filters: list[str | None] = [*spec.filters, OTHER] if spec.filters else [None]
        self.genes: list[Gene] = []
        labels = short_names(self.models)
        for param, bounds in spec.parameters.items():
            scope = self._scope(param)
            if scope == Scope.NON_BASE:
                self._no_base(template, param)
            for model in self.models if scope != Scope.SHARED else [None]:
                for filt in self.filters:
                    for layers in self.groups:
                        parts = [param, labels[model] if model else None, filt, _span(layers)]
                        self.genes.append(
                            Gene(
                                name=".".join(p for p in parts if p is not None),
                                param=param,
                                model=model,
                                filter=filt,
                                layers=layers,
                                low=bounds.low,
                                high=bounds.high,
                                init=bounds.start,
                                sigma=bounds.step,
                            )
                        )
        if not self.genes:
            raise SearchError("space: no genes to search (no models besides the base?)")

    def _scope(self, param: str) -> Scope:
        spec = self.method.param(param)
        if spec is None:
            names = ", ".join(p.name for p in self.method.params) or "no parameters"
            raise SearchError(
                f"space.parameters.{param}: merge method {self.method.name} has no parameter "
                f"{param!r}; it takes {names}"
            )
        if spec.type is bool:
            raise SearchError(f"space.parameters.{param}: {param} is a switch, not a number")
        return spec.scope

    def _no_base(self, template: Recipe, param: str) -> None:
        """A base model's gene for a parameter the method reads from other models only would
        change nothing."""
        if template.base_model in self.models:
            raise SearchError(
                f"space.models: {template.base_model} is the base model, which has no {param} "
                f"in {self.method.name} (only the other models do); leave it out"
            )

    def make_executor(self, recipe: SearchRecipe, suites: dict[str, TaskSuite]) -> Executor:
        """Recipes materialized in place: in this process, or on Ray workers."""
        first = self.to_recipe(self.init())
        options = {
            "device": recipe.device,
            "seed": recipe.seed,
            "allow_pickle": recipe.allow_pickle,
            "placement": choose_placement(first, recipe),
        }
        if recipe.executor == "ray":
            from evomerge.search.ray_executor import RayExecutor

            return RayExecutor(
                first,
                recipe.fitness,
                workers=recipe.workers,
                address=recipe.ray_address,
                threads=recipe.threads,
                **options,
            )
        from evomerge.search.executor import SerialExecutor

        return SerialExecutor(first, suites, **options)

    @staticmethod
    def _layer_groups(spec: SpaceSpec, num_layers: int | None) -> list[tuple[int, int] | None]:
        size = spec.layer_granularity
        if size is None:
            return [None]
        if num_layers is None:
            raise SearchError(
                "space.layer_granularity: the layer count is unknown (the base model's config "
                "is not on this machine); set space.num_layers"
            )
        if size >= num_layers:
            return [None]
        return [(start, min(start + size, num_layers)) for start in range(0, num_layers, size)]

    @staticmethod
    def _searched_models(template: Recipe, spec: SpaceSpec) -> list[str]:
        listed = [m.model for m in template.models or []]
        if spec.models is None:
            return list(dict.fromkeys(m for m in listed if m != template.base_model))
        for name in spec.models:
            if name not in listed:
                raise SearchError(
                    f"space.models: {name} is not one of merge.models ({', '.join(listed)})"
                )
        return list(spec.models)

    # --- genome <-> recipe ---------------------------------------------------------------------

    def to_recipe(self, genome: Sequence[float]) -> Recipe:
        """The merge recipe of a genome: the template with the searched parameters filled in."""
        genome = self.check(genome)
        data = self.template.model_dump(mode="json", exclude_none=True)
        settings: dict[tuple[str, str | None], dict[str | None, list[float] | float]] = {}
        for gene, value in zip(self.genes, genome, strict=True):
            by_filter = settings.setdefault((gene.param, gene.model), {})
            if gene.layers is None:
                by_filter[gene.filter] = value
                continue
            layers = by_filter.setdefault(gene.filter, [0.0] * self.num_layers)  # type: ignore[operator]
            for i in range(*gene.layers):
                layers[i] = value  # type: ignore[index]
        for (param, model), by_filter in settings.items():
            setting = _setting(by_filter)
            if model is None:
                data.setdefault("parameters", {})[param] = setting
                continue
            for entry in data["models"]:
                if entry["model"] == model:
                    entry.setdefault("parameters", {})[param] = setting
        return Recipe.model_validate(data)

    def from_recipe(self, recipe: Recipe) -> list[float]:
        """The genome a recipe encodes (each gene read at the first layer of its group)."""
        params = {m.model: m.parameters or {} for m in recipe.models or []}
        genome = []
        for gene in self.genes:
            scope = recipe.parameters or {} if gene.model is None else params.get(gene.model, {})
            if gene.param not in scope:
                owner = gene.model or "the merge"
                raise SearchError(f"the recipe sets no {gene.param} for {owner}")
            first = gene.layers[0] if gene.layers else 0
            t = first / (self.num_layers - 1) if self.num_layers and self.num_layers > 1 else 0.0
            name = "" if gene.filter in (None, OTHER) else gene.filter
            spec = self.method.param(gene.param)
            value = evaluate_setting(name, scope[gene.param], t, spec)  # type: ignore[arg-type]
            genome.append(float(value))
        return genome


def _setting(by_filter: dict[str | None, Any]) -> Any:
    if list(by_filter) == [None]:
        return by_filter[None]
    return [
        {"value": value} if filt == OTHER else {"filter": filt, "value": value}
        for filt, value in by_filter.items()
    ]


def _span(layers: tuple[int, int] | None) -> str | None:
    if layers is None:
        return None
    start, end = layers
    return f"layers{start}" if end - start == 1 else f"layers{start}-{end - 1}"


def short_names(models: list[str]) -> dict[str, str]:
    """Readable gene labels: the last path part of each model, or its position when not unique."""
    names = {m: PurePath(m.split("@")[0]).name or m for m in models}
    if len(set(names.values())) < len(names):
        return {m: f"model{i}" for i, m in enumerate(models)}
    return names
