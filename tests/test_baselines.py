"""Baselines (search/baselines.py): the hand recipes, the tuned grid and random search a searched
merge is judged against, scored on both splits with their cost, and refused in one line where
they cannot apply. Hash-scored searches (no model) except where the merge itself is checked."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import HashExecutor, error_line, run, run_cli, write_recipe

from evomerge.merge.recipe import Recipe
from evomerge.merge.resident import ResidentMerger
from evomerge.search.baselines import grid, hand_recipe, wanted
from evomerge.search.config import GridBaseline, load_search_recipe


def _models(recipe: Recipe) -> dict[str, dict]:
    return {m.model: m.parameters for m in recipe.models or []}


def test_hand_recipes_use_mergekit_defaults(demo_family, tmp_path):
    base, a, b = (str(demo_family / n) for n in ("base", "expert_a", "expert_b"))
    ties = {"merge_method": "ties", "base_model": base, "models": [{"model": a}, {"model": b}],
            "dtype": "float32"}  # fmt: skip
    recipe = load_search_recipe(write_recipe(tmp_path / "r.yaml", demo_family, merge=ties))
    merge = recipe.merge
    assert merge.selection == "fast"  # the search's own, not the hand recipes'
    assert wanted(recipe) == ["task_arithmetic", "ties", "dare_ties"]  # the default
    for method in ("task_arithmetic", "ties", "dare_ties"):
        hand = hand_recipe(merge, method)
        assert hand.merge_method == method and hand.base_model == base
        assert hand.parameters is None and hand.selection is None and hand.dtype == "float32"
        expected = {"weight": 1.0} if method == "task_arithmetic" else {
            "weight": 1.0, "density": 0.5}  # fmt: skip
        assert _models(hand) == {a: expected, b: expected}


def test_the_grid_is_one_global_weight(demo_family, tmp_path):
    merge = load_search_recipe(write_recipe(tmp_path / "r.yaml", demo_family)).merge
    planned = grid(merge, GridBaseline())
    labels = [label for label, _ in planned.recipes]
    assert labels == ["0", "0.2", "0.4", "0.6", "0.8", "1", "1.2", "1.4", "1.6", "1.8", "2"]
    _, recipe = planned.recipes[3]
    weights = {p["weight"] for p in _models(recipe).values() if p}
    assert recipe.merge_method == "task_arithmetic" and weights == {0.6}


def test_a_search_reports_every_baseline_with_its_cost(demo_family, tmp_path):
    baselines = ["sources", "ties", {"grid": {"values": 3}}, "random"]
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, baselines=baselines)
    out = tmp_path / "out"
    executor = HashExecutor(["demo_combined"])
    summary = run(recipe, out, write_model=False, executor=executor)
    refs = {r.kind: r for r in summary.references}
    assert set(refs) == {"source", "uniform", "hand", "grid", "random", "best"}
    assert refs["best"].cost == 16 and refs["random"].cost == 16
    assert refs["hand"].cost == refs["uniform"].cost == 0 and refs["grid"].cost == 3
    # The grid keeps the weight with the best fitness, judged by the same scorer.
    fitness = {
        label: executor.score_recipe(candidate, ["fitness"])["fitness"].fitness
        for label, candidate in grid(load_search_recipe(recipe).merge, GridBaseline(values=3))
        .recipes
    }
    assert refs["grid"].name.endswith(f"weight {max(fitness, key=fitness.get)}")
    assert executor.evaluated == 32  # the search's 16 trials and the random search's 16
    report = (out / "report.md").read_text()
    assert "| ties (weight 1, density 0.5) | hand | 0 |" in report
    assert "| random search (best of 16" in report
    listed = json.loads((out / "summary.json").read_text())["references"]
    assert [r["kind"] for r in listed] == ["source"] * 3 + [
        "uniform", "best", "hand", "grid", "random"]  # fmt: skip
    assert all(r["heldout_stderr"] is not None for r in listed)
    # Resumed after it finished: nothing is scored again.
    again = HashExecutor(["demo_combined"])
    resumed = run(recipe, out, write_model=False, executor=again, resume=True)
    assert again.evaluated == 0
    assert [r.to_dict() for r in resumed.references] == [r.to_dict() for r in summary.references]


def test_the_random_baseline_resumes_where_it_stopped(demo_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, baselines=["random"])
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    class StopsInTheRandomSearch(HashExecutor):
        def run(self, candidate, ticket):
            outcome = super().run(candidate, ticket)
            if self.evaluated > 16 + 8:  # the random search's 9th candidate
                raise Stop
            return outcome

    with pytest.raises(Stop):
        run(recipe, out, write_model=False, executor=StopsInTheRandomSearch(["demo_combined"]))
    executor = HashExecutor(["demo_combined"])
    resumed = run(recipe, out, write_model=False, executor=executor, resume=True)
    assert executor.evaluated == 8  # the random search's last generations only
    fresh = run(recipe, tmp_path / "fresh", write_model=False,
                executor=HashExecutor(["demo_combined"]))  # fmt: skip
    assert [r.to_dict() for r in resumed.references] == [r.to_dict() for r in fresh.references]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"baselines": ["tie"]}, "unknown baseline 'tie' (did you mean ties?)"),
        ({"baselines": [{"grid": {"low": 1, "high": 0}}]}, "low (1.0) must be below high"),
        ({"baselines": [{"name": "mine", "recipe": "missing.yaml"}]}, "mine: "),
        ({"baselines": ["ties"], "space": {"type": "dfs"}}, "baselines: ties needs a parameter"),
    ],
)
def test_bad_baselines_are_one_line_in_a_run_and_a_dry_run(
    demo_family, tmp_path, monkeypatch, capsys, change, message
):
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, **change)
    for extra in (["--dry-run"], []):
        code, _, err = run_cli(["search", str(recipe), "--out", str(tmp_path / "o"), *extra],
                               monkeypatch, capsys)  # fmt: skip
        assert code == 2 and message in error_line(err)
    assert not (tmp_path / "o").exists()


def test_a_resident_merger_switches_between_task_vector_methods(tiny_family):
    """A hand baseline of another task-vector method is made in place by the search's merger:
    the same tensors as a merger built for it."""
    family = tiny_family()
    weighted = {"weight": 0.7, "density": 0.6}
    template = {
        "base_model": str(family.base),
        "models": [{"model": str(family.base)}]
        + [{"model": str(e), "parameters": weighted} for e in family.experts],
        "dtype": "float32",
    }
    searched = Recipe.model_validate({"merge_method": "dare_ties", **template})
    merger = ResidentMerger(searched, device="cpu", seed=5)
    model = merger.build_model()
    for method in ("ties", "task_arithmetic", "dare_ties"):
        other = hand_recipe(searched, method)
        merger.materialize(model, other)
        fresh = ResidentMerger(other, device="cpu", seed=5)
        expected = fresh.build_model()
        for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values(),
                                     strict=True):  # fmt: skip
            assert torch.equal(got, want), (method, name)
    slerp = Recipe.model_validate(
        {"merge_method": "slerp", "base_model": str(family.base),
         "models": [{"model": str(family.base)}, {"model": str(family.experts[0])}],
         "parameters": {"t": 0.5}, "dtype": "float32"}
    )  # fmt: skip
    with pytest.raises(Exception, match="cannot make a slerp merge"):
        merger.set_recipe(slerp)
    assert merger.plan.method.name == "dare_ties"  # unchanged by the refusal
    assert yaml.safe_load(searched.to_yaml())["merge_method"] == "dare_ties"
