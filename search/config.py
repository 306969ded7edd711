"""The search recipe: a mergekit merge recipe whose numbers are searched, the search space,
the fitness spec, the budget and the optimizer. Read from YAML and validated before any model
is touched; every error is one line naming the field.

    merge:                        # a mergekit recipe; the method defaults to dare_ties
      base_model: mistralai/Mistral-7B-v0.1
      models: [{model: a/x}, {model: b/y}]
      dtype: bfloat16
    space:
      parameters:                 # searched per model (or recipe-wide for t, lambda ...)
        weight: {low: 0, high: 1, init: 0.5, sigma: 0.1667}
        density: {low: 0.1, high: 1}
      layer_granularity: 8        # one value per group of 8 layers; omit for one per model
      filters: [self_attn, mlp]   # own values for these tensors (the rest share a third)
    fitness: fitness.yaml         # or the spec inline (see evomerge.evals.spec)
    budget: {evaluations: 1000, seconds: 86400}
    optimizer: {name: CMA, population: 20}
    seed: 0
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.evals.spec import FitnessSpec
from evomerge.merge.recipe import Recipe, describe_validation_error, parse_yaml, read_text
from evomerge.search.errors import SearchError

DEFAULT_METHOD = "dare_ties"  # Sakana's parameter-space setting


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParameterRange(_Strict):
    """Bounds, start and step of one searched parameter, in the parameter's own units."""

    model_config = ConfigDict(allow_inf_nan=False)  # a bound of inf breaks the unit cube
    low: float = 0.0
    high: float = 1.0
    init: float | None = None  # default: the middle of the range
    sigma: float | None = Field(default=None, gt=0)  # default: a sixth of the range

    @model_validator(mode="after")
    def _ordered(self) -> ParameterRange:
        if not self.low < self.high:
            raise ValueError(
                f"bounds inverted or empty: low ({self.low}) must be below high ({self.high})"
            )
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} lies outside [{self.low}, {self.high}]")
        return self

    @property
    def start(self) -> float:
        return (self.low + self.high) / 2 if self.init is None else self.init

    @property
    def step(self) -> float:
        return (self.high - self.low) / 6 if self.sigma is None else self.sigma


class SpaceSpec(_Strict):
    """Parameter space: numbers of the merge recipe (weights, densities ...)."""

    type: Literal["parameters"] = "parameters"
    parameters: dict[str, ParameterRange] = Field(min_length=1)
    layer_granularity: int | None = Field(default=None, gt=0)
    filters: list[str] = []
    models: list[str] | None = Field(default=None, min_length=1)  # default: all but the base
    num_layers: int | None = Field(default=None, gt=0)  # for --dry-run of Hub models offline

    @field_validator("filters")
    @classmethod
    def _distinct_filters(cls, filters: list[str]) -> list[str]:
        """Each filter must be able to match a tensor the earlier ones do not (the first
        matching `{filter, value}` entry wins), or its genes would change nothing."""
        for i, filt in enumerate(filters):
            if not filt or filt == "*":
                raise ValueError(f"{filt!r} is not a filter; give part of a tensor name")
            if filt in filters[:i]:
                raise ValueError(f"{filt!r} is listed twice")
            for earlier in filters[:i]:
                if earlier in filt:
                    raise ValueError(
                        f"{filt!r} never applies: every tensor it matches matches {earlier!r} "
                        "first; list the more specific filter first"
                    )
        return filters

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[str] | None) -> list[str] | None:
        if models is not None and len(set(models)) < len(models):
            raise ValueError("a model is listed twice")
        return models


class DfsSpec(_Strict):
    """Data-flow space (Akiba et al. 2024, sec. 3.2): which layers of which model the hidden
    state passes through, in which order, and the scale of each hop's input.

    The layers of all models, laid out [model A's, model B's, ...], repeat `repeats` times: one
    on/off gene per slot (on when positive) in [-1, 1]. A is the merge's base model (else the
    first): it gives the embeddings, the tokenizer and lm_head; with `pin_ends` its first and
    last layers start and end every path. The genes of A's first repetition start on (+0.5), the
    others off (-0.5), so the search starts from model A.
    """

    type: Literal["dfs"] = "dfs"
    repeats: int = Field(default=2, gt=0)
    pin_ends: bool = True
    on_sigma: float = Field(default=0.5, gt=0)  # step of the on/off genes
    # matrix: W[i][j] scales the input of layer j when it follows layer i (Sakana's W);
    # per_slot: one scale per slot; none: every scale is 1.
    scale_form: Literal["matrix", "per_slot", "none"] = "matrix"
    scales: ParameterRange = ParameterRange(low=0.5, high=2.0, init=1.0, sigma=0.1)
    num_layers: int | None = Field(default=None, gt=0)  # per model, for --dry-run offline

    @field_validator("scales")
    @classmethod
    def _positive(cls, scales: ParameterRange) -> ParameterRange:
        if scales.low <= 0:
            raise ValueError(f"scales must be positive: low is {scales.low}")
        return scales


class PsDfsSpec(_Strict):
    """Two stages (Akiba et al. 2024, PS+DFS): a parameter-space search of the merge, then a
    data-flow search over the layers of its best merge (model A) and `partner` (model B, by
    default the first model of the merge other than its base). Each stage gets the budget."""

    type: Literal["ps+dfs"]
    ps: SpaceSpec
    dfs: DfsSpec = DfsSpec()
    partner: str | None = None


class BudgetSpec(_Strict):
    evaluations: int | None = Field(default=None, gt=0)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSpec:
        if self.evaluations is None and self.seconds is None:
            raise ValueError("give evaluations, seconds, or both")
        return self


class OptimizerSpec(_Strict):
    backend: Literal["nevergrad", "optuna"] = "nevergrad"
    name: str = "CMA"  # a Nevergrad optimizer, or an Optuna sampler class name
    population: int | None = Field(default=None, gt=0)  # candidates evaluated per generation
    options: dict[str, Any] = {}  # keyword arguments for the optimizer or sampler


HAND_METHODS = ("task_arithmetic", "ties", "dare_ties")  # hand recipes, mergekit's defaults
BASELINE_NAMES = ("sources", "uniform", *HAND_METHODS, "grid", "random")


class GridBaseline(_Strict):
    """Task arithmetic with one global weight for every model but the base, `values` weights
    from `low` to `high`: the best on the fitness split is judged on the held-out split."""

    low: float = 0.0
    high: float = 2.0
    values: int = Field(default=11, ge=2)

    @model_validator(mode="after")
    def _ordered(self) -> GridBaseline:
        if not self.low < self.high:
            raise ValueError(f"grid: low ({self.low}) must be below high ({self.high})")
        return self


class RecipeBaseline(_Strict):
    """A merge recipe of your own (a mergekit YAML file, relative to the search recipe)."""

    name: str = Field(min_length=1)
    recipe: Path


Baseline = str | GridBaseline | RecipeBaseline


class SearchRecipe(_Strict):
    merge: Recipe
    space: Annotated[SpaceSpec | DfsSpec | PsDfsSpec, Field(discriminator="type")]
    fitness: FitnessSpec
    budget: BudgetSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    seed: int = 0
    device: str = "auto"
    allow_pickle: bool = False  # also load pickled .bin weights (can run code: trusted only)
    executor: Literal["serial", "ray"] = "serial"
    workers: int | None = Field(default=None, gt=0)  # Ray workers (default: one per GPU or CPU)
    ray_address: str | None = None  # an existing Ray cluster ('auto'); default: start one here
    threads: int | None = Field(default=None, gt=0)  # CPU threads (default 1 on CPU)
    # Where the resident sources live (merge/resident.py): device, host (streamed to the device
    # tensor by tensor), auto (device when the memory plan fits the free device memory).
    sources: Literal["device", "host", "auto"] = "auto"
    storage: str | None = None  # an Optuna storage URL (default: SQLite in the output dir)
    study_name: str = "evomerge"
    out: Path | None = None  # default: runs/<recipe file stem>
    # What the best merge is judged against besides the sources and the uniform merge (always
    # scored): hand recipes (task_arithmetic, ties, dare_ties with mergekit's defaults), a
    # tuned task-arithmetic `grid`, `random` search with the same budget, or {name, recipe}.
    # Default: the three hand recipes when the merge has a base model (search/baselines.py).
    baselines: list[Baseline] | None = None

    @field_validator("baselines", mode="before")
    @classmethod
    def _baseline_forms(cls, entries: Any) -> Any:
        if not isinstance(entries, list):
            return entries
        out = []
        for entry in entries:
            if entry == "grid":
                entry = GridBaseline()
            elif isinstance(entry, dict) and set(entry) == {"grid"}:
                entry = GridBaseline.model_validate(entry["grid"] or {})
            elif isinstance(entry, str) and entry not in BASELINE_NAMES:
                import difflib

                close = difflib.get_close_matches(entry, BASELINE_NAMES, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(
                    f"unknown baseline {entry!r}{hint}; use {', '.join(BASELINE_NAMES)}, "
                    "or {name: ..., recipe: FILE}"
                )
            elif isinstance(entry, dict) and ("name" in entry or "recipe" in entry):
                try:
                    entry = RecipeBaseline.model_validate(entry)
                except ValidationError as exc:
                    raise ValueError(describe_validation_error(exc)) from None
            elif not isinstance(entry, str | dict | GridBaseline | RecipeBaseline):
                raise ValueError(
                    f"a baseline is a name ({', '.join(BASELINE_NAMES)}), {{grid: {{...}}}} or "
                    f"{{name: ..., recipe: FILE}}; got {entry!r}"
                )
            out.append(entry)
        return out

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        space = data.get("space")
        if isinstance(space, dict) and "type" not in space:
            space = {"type": "parameters", **space}
            data = {**data, "space": space}
        if isinstance(data.get("merge"), dict):
            dfs = isinstance(space, dict) and space.get("type") == "dfs"
            method = "passthrough" if dfs else DEFAULT_METHOD
            merge = {"merge_method": method, **data["merge"]}
            if _trims_by_magnitude(merge["merge_method"]):
                # Candidates trim in linear time; best_recipe.yaml records it, so `evomerge
                # merge` of it rebuilds exactly the model that was scored.
                merge.setdefault("selection", "fast")
            data = {**data, "merge": merge}
        return data

    def fingerprint(self) -> str:
        """A hash of everything that decides which trials the search makes (not where it writes
        or how long it runs), to refuse resuming with a changed recipe."""
        decisive = self.model_dump(
            mode="json", include={"merge", "space", "fitness", "optimizer", "seed"}
        )
        decisive["fitness"].pop("include_path", None)
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def _trims_by_magnitude(method: Any) -> bool:
    from evomerge.merge.methods import get_method, method_names

    if not isinstance(method, str) or method not in method_names():
        return False  # an unknown method is reported by the recipe's own validation
    kind = get_method(method).extras.get("sparsification")
    return kind in ("magnitude", "magnitude_outliers")


def parse_search_recipe(data: Any, origin: str, base_dir: Path | None = None) -> SearchRecipe:
    if not isinstance(data, dict):
        raise SearchError(f"{origin}: expected a mapping with merge, space, fitness and budget")
    if isinstance(data.get("fitness"), str) and base_dir is not None:
        data = {**data, "fitness": _fitness_file(base_dir / data["fitness"], origin)}
    elif isinstance(data.get("fitness"), dict) and base_dir is not None:
        paths = data["fitness"].get("include_path") or []
        data = {
            **data,
            "fitness": {
                **data["fitness"],
                "include_path": [str(base_dir / p) for p in paths],
            },
        }
    if base_dir is not None and isinstance(data.get("baselines"), list):
        data = {
            **data,
            "baselines": [
                {**b, "recipe": str(base_dir / b["recipe"])}
                if isinstance(b, dict) and isinstance(b.get("recipe"), str)
                else b
                for b in data["baselines"]
            ],
        }
    try:
        return SearchRecipe.model_validate(data)
    except ValidationError as exc:
        message = describe_validation_error(exc, {"space": {"parameters", "dfs", "ps+dfs"}})
        raise SearchError(f"{origin}: {message}") from None


def _fitness_file(path: Path, origin: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SearchError(f"{origin}: fitness: cannot read {path}: {exc.strerror}") from None
    data = parse_yaml(text, str(path), SearchError)
    if not isinstance(data, dict):
        raise SearchError(f"{path}: expected a fitness spec mapping with a 'tasks' list")
    paths = data.get("include_path") or []
    return {**data, "include_path": [str(path.parent / p) for p in paths]}


def load_search_recipe(path: str | Path) -> SearchRecipe:
    path = Path(path)
    text = read_text(path, "the search recipe", SearchError)
    return parse_search_recipe(parse_yaml(text, str(path), SearchError), str(path), path.parent)
