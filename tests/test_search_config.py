"""The search recipe: parsing, one-line errors naming the field, the fingerprint, and the same
errors through `evomerge search --dry-run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.search.config import OptimizerSpec, load_search_recipe, parse_search_recipe
from evomerge.search.errors import SearchError
from evomerge.search.optimizers import check_optimizer

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
TASK = {"task": "demo_combined", "metric": "exact_match", "heldout": "demo_combined_heldout"}


def recipe_data(**changes) -> dict:
    data = {
        "merge": {
            "merge_method": "dare_ties",
            "base_model": "org/base",
            "models": [{"model": "org/expert_a"}, {"model": "org/expert_b"}],
        },
        "space": {"parameters": {"weight": {"low": 0, "high": 1}}},
        "fitness": {"tasks": [TASK]},
        "budget": {"evaluations": 10},
    }
    return {**data, **changes}


def error_of(data: dict, base_dir: Path | None = None) -> str:
    with pytest.raises(SearchError) as exc:
        parse_search_recipe(data, "s.yaml", base_dir)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_demo_recipe_parses():
    recipe = load_search_recipe(DEMO)
    assert recipe.merge.merge_method == "dare_ties"
    assert [m.model for m in recipe.merge.models] == [
        "./demo/family/expert_a",
        "./demo/family/expert_b",
    ]
    assert set(recipe.space.parameters) == {"weight", "density"}
    assert recipe.space.parameters["density"].start == 0.5
    assert recipe.budget.evaluations == 150


def test_merge_method_defaults_to_dare_ties():
    data = recipe_data()
    del data["merge"]["merge_method"]
    assert parse_search_recipe(data, "s.yaml").merge.merge_method == "dare_ties"


@pytest.mark.parametrize(
    ("method", "given", "expected"),
    [
        ("ties", None, "fast"),
        ("breadcrumbs_ties", None, "fast"),
        ("ties", "mergekit", "mergekit"),
        ("dare_ties", None, None),
        ("della", None, None),
    ],
)
def test_searches_trim_in_linear_time_unless_told(method, given, expected):
    """Candidates of magnitude-trimming methods use the fast selection (recorded in the recipes
    the search writes); a recipe that names a selection keeps it; other methods get none."""
    data = recipe_data()
    data["merge"]["merge_method"] = method
    if given:
        data["merge"]["selection"] = given
    assert parse_search_recipe(data, "s.yaml").merge.selection == expected


def test_parameter_range_defaults():
    weight = parse_search_recipe(recipe_data(), "s.yaml").space.parameters["weight"]
    assert (weight.start, weight.step) == (0.5, pytest.approx(1 / 6))


def _without_models(data):
    del data["merge"]["models"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_without_models, "merge: give exactly one of 'models' or 'slices'"),
        (lambda d: d["space"].update(parameters={"weight": {"low": 1, "high": 0}}), "weight"),
        (lambda d: d["space"].update(parameters={"weight": {"low": 0, "high": 0}}), "inverted"),
        (lambda d: d["space"].update(parameters={"weight": {"init": 1.5}}), "init 1.5 lies"),
        (lambda d: d["space"].update(parameters={"weight": {"high": float("inf")}}), "finite"),
        (lambda d: d["space"].update(parameters={"weight": {"sigma": 0}}), "weight.sigma"),
        (lambda d: d["space"].update(parameters={}), "space.parameters"),
        (lambda d: d["space"].update(filters=["mlp", "mlp"]), "space.filters: 'mlp' is listed"),
        (lambda d: d["space"].update(filters=["attn", "self_attn"]), "'self_attn' never"),
        (lambda d: d["space"].update(filters=["*"]), "space.filters"),
        (lambda d: d["space"].update(models=["org/expert_a"] * 2), "space.models"),
        (lambda d: d["space"].update(layer_granularity=0), "space.layer_granularity"),
        (lambda d: d.update(budget={"evaluations": 0}), "budget.evaluations"),
        (lambda d: d.update(budget={}), "budget: give evaluations, seconds, or both"),
        (lambda d: d.update(optimizer={"backend": "pygad"}), "optimizer.backend"),
        (lambda d: d.update(bogus=1), "bogus: unknown key"),
        (lambda d: d["space"].update(granularity=2), "space.granularity: unknown key"),
        (lambda d: d.update(fitness={"tasks": []}), "fitness.tasks"),
    ],
)
def test_recipe_errors_are_one_line_naming_the_field(change, expected):
    data = recipe_data()
    change(data)
    assert expected in error_of(data)


def test_filters_in_a_usable_order_are_accepted():
    recipe = parse_search_recipe(
        recipe_data(space={"parameters": {"weight": {}}, "filters": ["self_attn", "attn"]}),
        "s.yaml",
    )
    assert recipe.space.filters == ["self_attn", "attn"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "CMAA"}, "'CMAA' is not a Nevergrad optimizer; did you mean CMA"),
        ({"backend": "optuna", "name": "CMA"}, "'CMA' is not an Optuna sampler"),
        ({"name": "DE", "options": {"popsize": 4}}, "optimizer.options"),
    ],
)
def test_unknown_optimizer(spec, expected):
    with pytest.raises(SearchError, match=expected) as exc:
        check_optimizer(OptimizerSpec(**spec))
    assert "\n" not in str(exc.value) and str(exc.value).startswith("optimizer.")


@pytest.mark.parametrize(
    "spec, option",
    [
        ({}, "popsize"),  # nevergrad CMA
        ({"backend": "optuna", "name": "TPESampler"}, "n_startup_trials"),
        ({"backend": "optuna", "name": "CmaEsSampler"}, "popsize"),
    ],
)
def test_known_optimizers_and_their_options_pass_and_a_typo_does_not(spec, option):
    check_optimizer(OptimizerSpec(**spec, options={option: 4}))
    with pytest.raises(SearchError, match=f"did you mean {option}"):
        check_optimizer(OptimizerSpec(**spec, options={option[:-1] + "z": 4}))
    check_optimizer(OptimizerSpec(name="NGOpt"))


def test_fitness_file_is_read_relative_to_the_recipe(tmp_path):
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump({"tasks": [TASK], "limit": 5}))
    recipe = parse_search_recipe(recipe_data(fitness="fit.yaml"), "s.yaml", tmp_path)
    assert recipe.fitness.limit == 5
    message = error_of(recipe_data(fitness="missing.yaml"), tmp_path)
    assert "s.yaml: fitness: cannot read" in message and "missing.yaml" in message


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("merge:\n  models: [a\nspace: {}\n")
    with pytest.raises(SearchError, match=r"bad\.yaml: malformed YAML at line 3") as exc:
        load_search_recipe(path)
    assert "\n" not in str(exc.value)
    with pytest.raises(SearchError, match="cannot read the search recipe"):
        load_search_recipe(tmp_path / "nothing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(SearchError, match="expected a mapping"):
        load_search_recipe(path)


# --- fingerprint --------------------------------------------------------------------------------


def fingerprint(**changes) -> str:
    return parse_search_recipe(recipe_data(**changes), "s.yaml").fingerprint()


def test_fingerprint_follows_what_decides_the_trials():
    base = fingerprint()
    assert fingerprint() == base
    decisive = [
        {"space": {"parameters": {"weight": {"low": 0, "high": 0.9}}}},
        {"merge": {**recipe_data()["merge"], "dtype": "bfloat16"}},
        {"fitness": {"tasks": [TASK], "limit": 3}},
        {"optimizer": {"name": "DE"}},
        {"seed": 1},
    ]
    for changes in decisive:
        assert fingerprint(**changes) != base, changes
    not_decisive = [
        {"budget": {"evaluations": 500, "seconds": 60}},
        {"out": "elsewhere"},
        {"device": "cpu"},
        {"threads": 4},
        {"study_name": "other"},
    ]
    for changes in not_decisive:
        assert fingerprint(**changes) == base, changes


# --- the command line ---------------------------------------------------------------------------


def dry_run(tmp_path: Path, data: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "evomerge", "search", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


@pytest.fixture
def tiny_recipe(tiny_family):
    family = tiny_family()
    merge = {
        "base_model": str(family.base),
        "models": [{"model": str(e)} for e in family.experts],
    }
    return recipe_data(merge=merge, space={"parameters": {"weight": {}}, "layer_granularity": 3})


def test_dry_run_of_a_valid_recipe(tmp_path, tiny_recipe):
    result = dry_run(tmp_path, tiny_recipe)
    assert result.returncode == 0, result.stderr
    assert "s.yaml: valid" in result.stdout
    assert "space: 4 genes" in result.stdout
    assert "weight.expert_1.layers0-2" in result.stdout
    assert "weight.expert_2.layers3" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["space"]["parameters"].update(weight={"low": 1, "high": 0}), "weight"),
        (lambda d: d.update(optimizer={"name": "NoSuchOptimizer"}), "NoSuchOptimizer"),
        pytest.param(  # indexes lm-eval's whole registry to be sure the task is unknown
            lambda d: d["fitness"]["tasks"][0].update(task="demo_nonexistent"),
            "demo_nonexistent",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["bounds", "optimizer", "unknown-task"],
)
def test_dry_run_errors_exit_2_with_one_line(tmp_path, tiny_recipe, change, expected):
    change(tiny_recipe)
    result = dry_run(tmp_path, tiny_recipe)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "s.yaml" in lines[0]


def test_storage_errors_never_show_the_password_even_in_pieces():
    from evomerge.search.journal import redact, scrub

    url = "postgresql://bob:se@cr3t!pw@db.example:5432/x"  # an unescaped @ in the password
    assert "cr3t" not in redact(url) and redact(url).startswith("postgresql://bob:***@")
    driver = "could not translate host name 'cr3t!pw@db.example' to address"
    assert "cr3t" not in scrub(driver, url) and "db.example" in scrub(driver, url)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases ("billion laughs") in optimizer.options: refused while parsing,
    before anything walks the 4-billion-node expansion."""
    import time

    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        levels.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    text = yaml.safe_dump(recipe_data()) + "optimizer:\n  options:\n"
    text += "".join(f"    {line}\n" for line in levels)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(SearchError, match="alias") as err:
        load_search_recipe(path)
    assert time.perf_counter() - started < 5 and "\n" not in str(err.value)
