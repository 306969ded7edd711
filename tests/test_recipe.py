"""The recipe schema and parameter resolution, without any model."""

from __future__ import annotations

import copy

import pytest
import yaml

from evomerge.merge.errors import MergeError
from evomerge.merge.methods import get_method
from evomerge.merge.parameters import check_parameter_names, evaluate_setting, resolve
from evomerge.merge.recipe import ConditionalSetting, Recipe, parse_recipe
from evomerge.merge.refs import ModelRef

WEIGHT = get_method("ties").param("weight")
NORMALIZE = get_method("ties").param("normalize")


def test_models_form_round_trips_through_yaml():
    text = """
merge_method: dare_ties
base_model: org/base@v1
models:
  - model: org/a
    parameters: {weight: [0.1, 0.5, 0.9], density: 0.5}
  - model: org/b
    parameters:
      weight: [{filter: self_attn, value: 0.2}, {value: 0.8}]
parameters: {int8_mask: true}
dtype: bf16
"""
    recipe = Recipe.from_yaml(text)
    assert recipe.dtype == "bfloat16"
    assert recipe.referenced_models() == ["org/base@v1", "org/a", "org/b"]
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert "[0.1, 0.5, 0.9]" in recipe.to_yaml()  # gradients stay flow-style lists


def test_mergekit_model_reference_dict_form():
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [
                {
                    "model": {"model": {"path": "org/a", "revision": "abc"}},
                    "parameters": {"weight": 1},
                }
            ],
        }
    )
    assert recipe.models[0].model == "org/a@abc"
    assert ModelRef.parse("org/a@abc") == ModelRef("org/a", "abc")
    assert ModelRef.parse("org/a@abc").hub_id == "org/a"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"merge_method": "linear"}, "exactly one of 'models' or 'slices'"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "slices": [{"sources": []}]},
            "slices.0.sources",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}],
            },
            "slices.0.sources.0.layer_range",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "out_dtype": "int8"},
            "out_dtype: 'int8' is not a dtype",
        ),
        ({"merge_method": "linear", "modules": {}}, "modules"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}],
             "tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "a"}}}}},
            "tokenizer.tokens.x.source: model_token: give exactly one of token_id or token",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}],
             "tokenizer": {"tokens": {"x": {"source": {"kind": "mean"}}}}},
            "tokenizer.tokens.x.source: kind 'mean' is not one of zero, model_token",
        ),
    ],
)
def test_invalid_recipes_name_the_field(data, expected):
    with pytest.raises(MergeError) as info:
        parse_recipe(data, origin="r.yaml")
    message = str(info.value)
    assert message.startswith("r.yaml: ")
    assert expected in message
    assert "\n" not in message


IGNORED_BY_MERGEKIT = [
    ({"dype": "bfloat16"}, "dype: not a recipe key (did you mean dtype?)"),
    ({"name": "my-merge"}, "name: not a recipe key"),
    ({"models": [{"model": "a", "weight": 1}]}, "models[0].weight: not a recipe key"),
    (
        {"models": [{"model": "a", "parameters": {"weight": 1, "densty": 0.5}}]},
        "models[0].parameters.densty: linear takes no such parameter",
    ),
    (
        {"merge_method": "model_stock", "base_model": "b", "models": [
            {"model": "a", "parameters": {"weight": 1.0}}, {"model": "c"}]},
        "models[0].parameters.weight: model_stock takes no such parameter",
    ),
    (
        {"models": None, "slices": [{"sources": [
            {"model": "a", "layer_range": [0, 2], "weight": 1}]}]},
        "slices[0].sources[0].weight: not a recipe key",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("change", "expected"), IGNORED_BY_MERGEKIT)
def test_what_mergekit_ignores_is_a_warning_and_strict_refuses_it(change, expected):
    """mergekit 0.1.5 merges these recipes, ignoring the key (checked with mergekit itself:
    tests/test_mergekit_parity.py); evomerge drops it with a warning that names it."""
    data = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "c"}], **change}
    data = {k: v for k, v in data.items() if v is not None}
    before = copy.deepcopy(data)
    warnings: list[str] = []
    recipe = parse_recipe(data, origin="r.yaml", warn=warnings.append)
    assert data == before  # the input is not modified
    assert len(warnings) == 1 and warnings[0].startswith(f"r.yaml: {expected}")
    assert "mergekit ignores it" in warnings[0] and "\n" not in warnings[0]
    assert "dype" not in recipe.to_yaml() and "densty" not in recipe.to_yaml()
    with pytest.raises(MergeError) as info:
        parse_recipe(data, origin="r.yaml", strict=True)
    assert str(info.value) == f"r.yaml: {expected}; remove it (--strict)"


def test_a_single_module_recipe_is_read_as_its_module():
    module = {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}],
              "parameters": {"weight": 0.5}}  # fmt: skip
    data = {"merge_method": "linear", "modules": {"default": module}, "parameters": {"weight": 1}}
    recipe = parse_recipe(data)
    assert recipe.slices[0].sources[0].model == "a"
    assert recipe.parameters == {"weight": 0.5}  # the module's own are the more specific
    two = {"merge_method": "linear", "modules": {"a": module, "b": module}}
    with pytest.raises(MergeError, match="modules: 2 modules; only a single-module recipe"):
        parse_recipe(two, origin="r.yaml")


def test_malformed_yaml_names_the_line():
    with pytest.raises(MergeError, match=r"r.yaml: malformed YAML at line 3"):
        Recipe.from_yaml("merge_method: ties\nmodels:\n  - model: a: b\n", origin="r.yaml")


def test_gradient_interpolates_like_mergekit():
    gradient = [0.0, 1.0, 0.5]
    assert evaluate_setting("x", gradient, 0.0, WEIGHT) == 0.0
    assert evaluate_setting("x", gradient, 0.25, WEIGHT) == pytest.approx(0.5)
    assert evaluate_setting("x", gradient, 0.5, WEIGHT) == 1.0
    assert evaluate_setting("x", gradient, 0.75, WEIGHT) == pytest.approx(0.75)
    assert evaluate_setting("x", gradient, 1.0, WEIGHT) == 0.5
    # Non-numeric lists select, they do not interpolate.
    assert evaluate_setting("x", [True, False], 0.4, NORMALIZE) is True
    assert evaluate_setting("x", [True, False], 1.0, NORMALIZE) is False


def test_filters_first_match_wins_with_plain_value_fallback():
    setting = [
        ConditionalSetting(filter="self_attn", value=0.1),
        ConditionalSetting(filter="attn", value=0.2),
        ConditionalSetting(value=[0.0, 1.0]),
    ]
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", setting, 0.5, WEIGHT) == 0.1
    assert evaluate_setting("model.layers.0.cross_attn.weight", setting, 0.5, WEIGHT) == 0.2
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", setting, 0.5, WEIGHT) == 0.5
    no_fallback = [ConditionalSetting(filter="mlp", value=0.3)]
    assert evaluate_setting("model.norm.weight", no_fallback, 0.0, WEIGHT) is None


def test_precedence_source_over_slice_over_top():
    source, out_slice, top = (
        {"weight": 0.1},
        {"weight": 0.2, "density": 0.4},
        {"weight": 0.3, "density": 0.5},
    )
    density = get_method("ties").param("density")
    assert resolve(WEIGHT, (source, out_slice, top), "t", 0.0, "m") == 0.1
    assert resolve(WEIGHT, (None, out_slice, top), "t", 0.0, "m") == 0.2
    assert resolve(density, ({}, None, top), "t", 0.0, "m") == 0.5
    assert resolve(density, (None, None, None), "t", 0.0, "m") == 1.0  # default
    # A filter list that matches nothing falls through to the next scope.
    unmatched = {"weight": [ConditionalSetting(filter="mlp", value=0.9)]}
    assert resolve(WEIGHT, (unmatched, None, top), "attn", 0.0, "m") == 0.3
    with pytest.raises(MergeError, match="'weight' is required"):
        resolve(WEIGHT, (None, None, None), "t", 0.0, "m")


def test_parameter_names_and_values_are_checked():
    ties = get_method("ties")
    with pytest.raises(
        MergeError, match=r"models\[0\]\.parameters\.densty: not a parameter of ties"
    ):
        check_parameter_names(ties, {"densty": 0.5}, "models[0]")
    with pytest.raises(MergeError, match=r"recipe\.parameters\.weight: 'abc' is not a valid"):
        check_parameter_names(
            ties, {"weight": [ConditionalSetting(filter="mlp", value="abc")]}, "recipe"
        )
    with pytest.raises(MergeError, match="not a parameter of della"):
        check_parameter_names(get_method("della"), {"gamma": 0.1}, "recipe")
    check_parameter_names(get_method("breadcrumbs"), {"gamma": 0.1, "weight": 1}, "recipe")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(MergeError, match=r"unknown method 'tiez'.*dare_ties"):
        get_method("tiez")


def test_recipe_yaml_is_valid_yaml_for_mergekit_schema():
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration

    recipe = Recipe.from_yaml(
        """
merge_method: passthrough
slices:
  - sources: [{model: org/a, layer_range: [0, 4], parameters: {scale: 0.5}}]
  - sources: [{model: org/b, layer_range: [2, 6]}]
tokenizer_source: union
"""
    )
    theirs = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert [s.sources[0].model.model.path for s in theirs.slices] == ["org/a", "org/b"]
    assert [s.sources[0].layer_range for s in theirs.slices] == [(0, 4), (2, 6)]
    assert theirs.slices[0].sources[0].parameters == {"scale": 0.5}
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe  # and our own writer round-trips


def test_written_recipes_mark_relative_local_models(tmp_path, monkeypatch):
    """`org/name` that is a folder here is written `./org/name`, so that mergekit or the Hub
    client never takes it for a repository id; Hub ids, absolute and ./ paths stay as they are."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "family" / "base").mkdir(parents=True)
    (tmp_path / "family" / "expert").mkdir()
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "family/base",
            "models": [
                {"model": "family/expert", "parameters": {"weight": 1.0}},
                {"model": "org/hub-model", "parameters": {"weight": 1.0}},
                {"model": str(tmp_path / "family" / "expert"), "parameters": {"weight": 0.5}},
            ],
            "tokenizer_source": "family/base",
        }
    )
    marked = yaml.safe_load(recipe.to_yaml(mark_local=True))
    assert marked["base_model"] == "./family/base"
    assert [m["model"] for m in marked["models"]] == [
        "./family/expert",
        "org/hub-model",
        str(tmp_path / "family" / "expert"),
    ]
    assert marked["tokenizer_source"] == "./family/base"
    assert yaml.safe_load(recipe.to_yaml())["base_model"] == "family/base"  # the hash's form
    assert parse_recipe(marked).referenced_models()[0] == "./family/base"
