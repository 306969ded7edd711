"""The parameter space: genome <-> recipe is a pure function, and the recipes it writes are
mergekit recipes whose resolved per-tensor parameters are exactly the gene values."""

from __future__ import annotations

import re

import pytest
import yaml

from evomerge.merge.plan import build_plan
from evomerge.merge.recipe import Recipe
from evomerge.search.config import SpaceSpec
from evomerge.search.errors import SearchError
from evomerge.search.space import ParameterSpace

EXPERTS = ["org/expert_a", "org/expert_b"]
FILTERS = ["self_attn", "mlp"]


def template(method: str = "dare_ties", models=EXPERTS, base: str | None = "org/base") -> Recipe:
    data = {"merge_method": method, "models": [{"model": m} for m in models], "dtype": "float32"}
    if base is not None:
        data["base_model"] = base
    return Recipe.model_validate(data)


def make_space(
    recipe: Recipe | None = None, num_layers: int | None = None, **spec
) -> ParameterSpace:
    spec.setdefault("parameters", {"weight": {}})
    return ParameterSpace(recipe or template(), SpaceSpec.model_validate(spec), num_layers)


def distinct_genome(space: ParameterSpace) -> list[float]:
    """Every gene a different value strictly inside its bounds."""
    n = len(space)
    return [g.low + (g.high - g.low) * (i + 1) / (n + 1) for i, g in enumerate(space.genes)]


ROUND_TRIPS = {
    "per-model scalars": dict(parameters={"weight": {}, "density": {"low": 0.1}}),
    "granularity 1": dict(parameters={"weight": {}}, layer_granularity=1, num_layers=5),
    "granularity 2, short last group": dict(
        parameters={"weight": {}, "density": {"low": 0.1}}, layer_granularity=2, num_layers=7
    ),
    "filters": dict(parameters={"weight": {}}, filters=FILTERS),
    "filters per layer group": dict(
        parameters={"weight": {}}, filters=FILTERS, layer_granularity=2, num_layers=5
    ),
    "slerp t (recipe-wide)": dict(
        method="slerp", base="org/expert_a", parameters={"t": {}}, layer_granularity=2, num_layers=5
    ),
    "multislerp weight": dict(method="multislerp", parameters={"weight": {}}),
    "nearswap t": dict(
        method="nearswap", base="org/expert_a", parameters={"t": {"low": 0, "high": 0.01}}
    ),
    "sce select_topk": dict(method="sce", parameters={"select_topk": {"low": 0.1}}),
    "ramplus_tl r and alpha": dict(
        method="ramplus_tl", parameters={"r": {}, "alpha": {}}, layer_granularity=2, num_layers=4
    ),
    "task_arithmetic lambda and weight": dict(
        method="task_arithmetic",
        parameters={"lambda": {"low": 0.5, "high": 1.5}, "weight": {}},
        filters=FILTERS,
    ),
}


@pytest.mark.parametrize("case", ROUND_TRIPS.values(), ids=list(ROUND_TRIPS))
def test_genome_recipe_round_trip(case):
    case = dict(case)
    recipe = template(case.pop("method", "dare_ties"), base=case.pop("base", "org/base"))
    space = make_space(recipe, case.pop("num_layers", None), **case)
    before = recipe.to_yaml()
    genome = distinct_genome(space)
    emitted = space.to_recipe(genome)
    assert space.from_recipe(emitted) == genome
    assert space.from_recipe(Recipe.from_yaml(emitted.to_yaml())) == genome
    assert space.to_recipe(genome).to_yaml() == emitted.to_yaml()  # pure: same genome, same text
    assert recipe.to_yaml() == before  # the template is not touched


def test_layer_groups_become_one_value_per_layer():
    space = make_space(layer_granularity=2, num_layers=7)
    names = [g.name for g in space.genes]
    assert names[:4] == [
        "weight.expert_a.layers0-1",
        "weight.expert_a.layers2-3",
        "weight.expert_a.layers4-5",
        "weight.expert_a.layers6",
    ]
    recipe = space.to_recipe([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    weights = [m.parameters["weight"] for m in recipe.models]
    assert weights == [
        [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4],
        [0.5, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8],
    ]


def test_filters_become_filter_entries_with_a_last_entry_for_the_rest():
    space = make_space(filters=FILTERS)
    assert [g.name for g in space.genes][:3] == [
        "weight.expert_a.self_attn",
        "weight.expert_a.mlp",
        "weight.expert_a.*",
    ]
    data = yaml.safe_load(space.to_recipe([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).to_yaml())
    assert data["models"][0]["parameters"]["weight"] == [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "mlp", "value": 0.2},
        {"value": 0.3},
    ]


def test_recipe_wide_parameters_go_to_top_level_parameters():
    space = make_space(template("slerp", base="org/expert_a"), parameters={"t": {}})
    assert [g.name for g in space.genes] == ["t"]
    recipe = space.to_recipe([0.25])
    assert recipe.parameters == {"t": 0.25}
    assert all(m.parameters is None for m in recipe.models)


# --- the emitted recipe against mergekit and against the merge plan ---------------------------

PLANNED = {
    "dare_ties, filters, groups of 3 of 4 layers": dict(
        method="dare_ties",
        parameters={"weight": {}, "density": {"low": 0.1}},
        filters=FILTERS,
        layer_granularity=3,
    ),
    "slerp t per layer": dict(method="slerp", parameters={"t": {}}, layer_granularity=1),
    "task_arithmetic lambda, weight": dict(
        method="task_arithmetic",
        parameters={"lambda": {"low": 0.5, "high": 1.5}, "weight": {}},
        layer_granularity=3,
    ),
}


@pytest.mark.parametrize("case", PLANNED.values(), ids=list(PLANNED))
def test_emitted_recipe_is_mergekit_valid_and_plans_to_the_gene_values(case, tiny_family):
    from mergekit.config import MergeConfiguration

    case = dict(case)
    family = tiny_family()
    base, experts = str(family.base), [str(e) for e in family.experts]
    method = case.pop("method")
    models = [base, *experts] if method == "slerp" else experts
    recipe = template(method, models=models[:2], base=base)
    space = make_space(recipe, 4, **case)
    genome = distinct_genome(space)
    text = space.to_recipe(genome).to_yaml()

    MergeConfiguration.model_validate(yaml.safe_load(text))
    plan = build_plan(Recipe.from_yaml(text))

    filters = case.get("filters", [])
    used = set()

    def gene_value(param: str, model: str | None, tensor: str) -> float:
        match = re.search(r"\.layers\.(\d+)\.", tensor)
        layer = int(match[1]) if match else 0  # embeddings, final norm, lm_head: the first value
        filt = next((f for f in filters if f in tensor), "*") if filters else None
        for i, g in enumerate(space.genes):
            in_group = g.layers is None or g.layers[0] <= layer < g.layers[1]
            if (g.param, g.model, g.filter) == (param, model, filt) and in_group:
                used.add(i)
                return genome[i]
        raise AssertionError(f"no gene for {param} of {model} at {tensor}")

    assert plan.num_layers == 4
    for task in plan.tasks:
        for gene in space.genes:
            if gene.model is None:
                assert task.shared[gene.param] == gene_value(gene.param, None, task.out_name)
        for (model, _), params in zip(task.inputs, task.per_input, strict=True):
            for param in {g.param for g in space.genes if g.model == model}:
                assert params[param] == gene_value(param, model, task.out_name), task.out_name
    assert used == set(range(len(space))), "some genes change no tensor"


# --- bounds and the unit cube -------------------------------------------------------------------


def bounded_space() -> ParameterSpace:
    return make_space(parameters={"weight": {}, "density": {"low": 0.1, "high": 0.9}})


def test_check_rejects_a_value_out_of_bounds_naming_the_gene():
    space = bounded_space()
    assert space.check([0.0, 1.0, 0.1, 0.9]) == [0.0, 1.0, 0.1, 0.9]
    for genome in ([0.5, 0.5, 0.95, 0.5], [0.5, 0.5, 0.5, float("nan")]):
        with pytest.raises(SearchError, match=r"density\.expert_") as exc:
            space.to_recipe(genome)
        assert "\n" not in str(exc.value)
    with pytest.raises(SearchError, match="3 numbers for 4 genes"):
        space.check([0.5, 0.5, 0.5])


def test_unit_cube_mapping():
    space = bounded_space()
    assert space.from_unit([-0.5, 2.0, 0.0, 1.0]) == pytest.approx([0.0, 1.0, 0.1, 0.9])
    assert space.from_unit([0.25, 0.5, 0.25, 0.5]) == pytest.approx([0.25, 0.5, 0.3, 0.5])
    for unit in ([0.0, 1.0, 0.0, 1.0], [0.1, 0.37, 0.5, 0.99]):
        assert space.to_unit(space.from_unit(unit)) == pytest.approx(unit, abs=1e-12)
    assert space.init() == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert space.to_unit(space.init()) == pytest.approx([0.5] * 4)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "spec", "num_layers", "message"),
    [
        (template("linear"), {"parameters": {"density": {}}}, None, "linear.*weight, normalize"),
        (template("linear"), {"parameters": {"normalize": {}}}, None, "normalize is a switch"),
        (template(), {"parameters": {"weight": {}}, "models": ["org/other"]}, None, "org/other"),
        (
            template(models=["org/base", *EXPERTS]),
            {"parameters": {"weight": {}}, "models": ["org/base", "org/expert_a"]},
            None,
            "org/base is the base model",
        ),
        (template(), {"parameters": {"weight": {}}, "layer_granularity": 2}, None, "num_layers"),
        (template(models=["org/base"]), {"parameters": {"weight": {}}}, None, "no genes"),
        (
            Recipe.model_validate(
                {
                    "merge_method": "linear",
                    "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}],
                }
            ),
            {"parameters": {"weight": {}}},
            2,
            "not 'slices'",
        ),
    ],
    ids=["not-a-parameter", "switch", "unknown-model", "base", "layers-unknown", "empty", "slices"],
)
def test_space_errors_are_one_line(recipe, spec, num_layers, message):
    with pytest.raises(SearchError, match=message) as exc:
        ParameterSpace(recipe, SpaceSpec.model_validate(spec), num_layers)
    assert "\n" not in str(exc.value)


# --- gene names ---------------------------------------------------------------------------------


def test_gene_names_are_unique_and_stable():
    spec = dict(
        parameters={"weight": {}, "density": {"low": 0.1}},
        filters=FILTERS,
        layer_granularity=2,
    )
    names = [g.name for g in make_space(num_layers=5, **spec).genes]
    assert len(names) == len(set(names)) == 2 * 2 * 3 * 3
    assert names == [g.name for g in make_space(num_layers=5, **spec).genes]
    assert names[0] == "weight.expert_a.self_attn.layers0-1"
    assert names[-1] == "density.expert_b.*.layers4"


def test_model_labels_fall_back_to_positions_when_last_parts_clash():
    for models in (["a/expert", "b/expert"], ["org/x@v1", "org/x@v2"]):
        names = [g.name for g in make_space(template(models=models)).genes]
        assert names == ["weight.model0", "weight.model1"]
    names = [g.name for g in make_space(template(models=["org/x@v1", "org/y"])).genes]
    assert names == ["weight.x", "weight.y"]
