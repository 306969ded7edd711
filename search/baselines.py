"""Baselines: what a searched merge is judged against besides the sources and the uniform merge.

A user who could have written a merge by hand, or tuned one number, or sampled at random, should
see whether the search bought anything over that. `baselines:` in a search recipe lists them:

- `task_arithmetic`, `ties`, `dare_ties`: the hand recipes people write with mergekit's
  defaults, weight 1 for every model but the base (and density 0.5 for the TIES family);
- `grid` (`{grid: {low: 0, high: 2, values: 11}}`): task arithmetic with one global weight for
  every model, each value scored on the fitness split, the best judged on the held-out split;
- `random`: random search over the same space (genomes drawn uniformly within the genes'
  bounds by Optuna's RandomSampler), with as many evaluations as the search made and the same
  fitness mode, in a study of its own (`STUDY-random`, beside the search's);
- `{name: ..., recipe: FILE}`: any mergekit recipe.

The default is the three hand recipes where the merge has a base model and models to merge (a
parameter-space search), none otherwise. `sources` and `uniform` may be listed; they are always
scored. Each baseline's scores are kept in the study, so a resumed search does not redo them;
its cost is the fitness evaluations spent choosing it (0 for a fixed recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evomerge.merge.recipe import Recipe, load_recipe
from evomerge.search.config import (
    HAND_METHODS,
    GridBaseline,
    RecipeBaseline,
    SearchRecipe,
    SpaceSpec,
)
from evomerge.search.errors import SearchError
from evomerge.search.records import ModelScores

HAND_DENSITY = 0.5  # the density people give TIES and DARE-TIES (mergekit's examples)
RANDOM = "random"
ALWAYS = ("sources", "uniform")  # scored by every search whatever the list says


@dataclass(frozen=True)
class Planned:
    """A baseline to score: its report name, kind and recipe(s)."""

    name: str
    kind: str  # 'hand', 'grid', 'recipe' (the random search's best is found by the search)
    recipes: list[tuple[str, Recipe]]  # (label, recipe): one, or the grid's values


def wanted(recipe: SearchRecipe) -> list[Any]:
    """The recipe's baselines with the default applied, without the always-scored ones."""
    if recipe.baselines is None:
        return list(HAND_METHODS) if _mergeable(recipe) else []
    return [b for b in recipe.baselines if b not in ALWAYS]


def wants_random(recipe: SearchRecipe) -> bool:
    return RANDOM in wanted(recipe)


def _mergeable(recipe: SearchRecipe) -> bool:
    merge = recipe.merge
    return (
        isinstance(recipe.space, SpaceSpec)
        and merge.base_model is not None
        and any(m.model != merge.base_model for m in merge.models or [])
    )


def check(recipe: SearchRecipe) -> list[Planned]:
    """The baselines to score, every one checked: hand recipes and the grid need a base model
    and models to merge; recipe files must parse. One line naming the baseline otherwise."""
    planned = []
    for entry in wanted(recipe):
        if entry == RANDOM:
            continue
        if isinstance(entry, RecipeBaseline):
            planned.append(Planned(entry.name, "recipe", [(entry.name, _read(entry))]))
            continue
        if not _mergeable(recipe):
            what = "grid" if isinstance(entry, GridBaseline) else entry
            raise SearchError(
                f"baselines: {what} needs a parameter-space search whose merge has a base_model "
                "and models to merge; remove it"
            )
        if isinstance(entry, GridBaseline):
            planned.append(grid(recipe.merge, entry))
        else:
            planned.append(Planned(hand_name(entry), "hand", [(entry, hand_recipe(recipe.merge,
                                                                                    entry))]))
    return planned


def _read(entry: RecipeBaseline) -> Recipe:
    from evomerge.merge.errors import MergeError

    try:
        return load_recipe(entry.recipe)
    except MergeError as exc:
        raise SearchError(f"baselines: {entry.name}: {exc}") from None


def hand_name(method: str) -> str:
    weights = "weight 1" + (f", density {HAND_DENSITY}" if method != "task_arithmetic" else "")
    return f"{method} ({weights})"


def _over(template: Recipe, method: str, parameters: dict[str, float]) -> Recipe:
    """`method` over the template's base and models with these parameters for every model but
    the base, and mergekit's defaults for everything else (no recipe-wide parameters, exact
    selection). The template's dtype and tokenizer settings are kept."""
    data = template.model_dump(mode="json", exclude_none=True)
    for key in ("parameters", "selection", "slices"):
        data.pop(key, None)
    data["merge_method"] = method
    data["models"] = [
        {"model": m.model} if m.model == template.base_model else
        {"model": m.model, "parameters": dict(parameters)}
        for m in template.models or []
    ]  # fmt: skip
    return Recipe.model_validate(data)


def hand_recipe(template: Recipe, method: str) -> Recipe:
    parameters = {"weight": 1.0}
    if method != "task_arithmetic":
        parameters["density"] = HAND_DENSITY
    return _over(template, method, parameters)


def grid(template: Recipe, spec: GridBaseline) -> Planned:
    step = (spec.high - spec.low) / (spec.values - 1)
    values = [round(spec.low + i * step, 10) for i in range(spec.values)]
    recipes = [(f"{v:g}", _over(template, "task_arithmetic", {"weight": v})) for v in values]
    name = f"task_arithmetic, best of {spec.values} global weights {spec.low:g}-{spec.high:g}"
    return Planned(name, "grid", recipes)


def score(
    planned: Planned,
    scorer: Callable[[Recipe, list[str]], dict[str, Any]],
    journal: Any,
    splits: list[str],
) -> ModelScores:
    """A planned baseline on `splits` (grid: each value on the fitness split, the best on every
    split), with its cost in fitness evaluations; kept in the study, so it is scored once."""
    key = f"baseline:{planned.name}"
    cached = journal.get_attr(key)
    if cached is None:
        label, recipe = planned.recipes[0]
        name, cost = planned.name, 0
        if planned.kind == "grid":
            fitness = {
                label: scorer(candidate, ["fitness"])["fitness"].fitness
                for label, candidate in planned.recipes
            }
            label = max(fitness, key=lambda k: fitness[k])  # the first of equals
            recipe = dict(planned.recipes)[label]
            name, cost = f"{planned.name}: weight {label}", len(planned.recipes)
        cached = ModelScores.of(name, planned.kind, scorer(recipe, splits), cost).to_dict()
        journal.set_attr(key, cached)
    return ModelScores.from_dict(cached)
