"""Data-flow search: genome -> path -> recipe, settings errors, and a search on the demo family
whose exported checkpoint is the model it evaluated."""

from __future__ import annotations

import math

import pytest
from helpers import mergekit_offline, write_recipe

from evomerge.merge.recipe import parse_recipe
from evomerge.merge.stacking import Hop
from evomerge.search.config import DfsSpec, parse_search_recipe
from evomerge.search.dfs import DataFlowSpace
from evomerge.search.errors import SearchError

A, B = "org/a", "org/b"


def space(layers=(3, 2), **spec) -> DataFlowSpace:
    template = parse_recipe(
        {"merge_method": "passthrough", "base_model": A, "models": [{"model": A}, {"model": B}]}
    )
    return DataFlowSpace(template, DfsSpec(type="dfs", **spec), {A: layers[0], B: layers[1]})


def test_the_initial_genome_is_model_a():
    s = space(repeats=2)
    assert len(s.slots) == 2 * 5 and len(s) == 10 + 5 * 5  # on/off genes + W
    assert s.path(s.init()) == [Hop("a", 0), Hop("a", 1), Hop("a", 2)]


def test_slots_scales_and_pins():
    s = space(repeats=2, scales={"low": 0.25, "high": 4.0, "init": 1.0})
    genome = s.init()
    on = {t: g for t, g in enumerate(s.genes[: s.n_slots])}
    for t in on:
        genome[t] = -1.0
    genome[s.slots.index(("b", 1))] = 1.0  # b[1] in repetition 0
    genome[5 + s.layers.index(("a", 1))] = 0.9  # a[1] in repetition 1
    m = len(s.layers)
    w = {(i, j): s.n_slots + i * m + j for i in range(m) for j in range(m)}
    index = s.layers.index
    genome[w[index(("a", 0)), index(("b", 1))]] = 2.0
    genome[w[index(("b", 1)), index(("a", 1))]] = 0.5
    genome[w[index(("a", 1)), index(("a", 2))]] = 3.0
    path = s.path(genome)
    assert path == [Hop("a", 0), Hop("b", 1, 2.0), Hop("a", 1, 0.5), Hop("a", 2, 3.0)]
    recipe = s.to_recipe(genome)  # mergekit passthrough, scales folded: 1 / (2 * 0.5 * 3)
    last = recipe.slices[-1].sources[0]
    assert last.model == A and last.layer_range == (2, 3)
    assert math.isclose(last.parameters["scale"][0].value, 1 / 3.0)


def test_per_slot_and_unscaled_forms():
    s = space(repeats=1, scale_form="per_slot")
    genome = s.init()
    genome[s.n_slots + 1] = 1.5  # a[1]'s own scale
    assert s.path(genome)[1] == Hop("a", 1, 1.5)
    plain = space(repeats=1, scale_form="none")
    assert len(plain) == plain.n_slots and all(h.scale == 1.0 for h in plain.path(plain.init()))


def test_a_path_with_no_layers_is_an_error():
    s = space(pin_ends=False)
    genome = [-1.0] * s.n_slots + s.init()[s.n_slots :]
    with pytest.raises(SearchError, match="a path with no layers"):
        s.candidate(genome)


def test_plain_frankenmerge_has_the_requested_length_and_unit_scales():
    s = space(repeats=2)
    for n in (2, 4, 7):
        path = s.plain_path(n)
        assert len(path) == n and path[0] == Hop("a", 0) and path[-1] == Hop("a", 2)
        assert all(h.scale == 1.0 for h in path)


@pytest.mark.parametrize(
    ("space_block", "field"),
    [
        ({"type": "dfs", "repeats": 0}, "space.repeats"),
        ({"type": "dfs", "scales": {"low": 0, "high": 2}}, "space.scales"),
        ({"type": "dfs", "scale_form": "diagonal"}, "space.scale_form"),
        ({"type": "dfs", "depth": 3}, "space.depth: unknown key"),
    ],
)
def test_bad_dfs_settings_are_one_line_errors(space_block, field):
    data = {
        "merge": {"base_model": A, "models": [{"model": A}, {"model": B}]},
        "space": space_block,
        "fitness": {"tasks": [{"task": "t", "metric": "m", "heldout": None}]},
        "budget": {"evaluations": 4},
    }
    with pytest.raises(SearchError) as err:
        parse_search_recipe(data, "s.yaml")
    assert field in str(err.value) and "\n" not in str(err.value)


def test_dfs_recipe_defaults_to_passthrough_and_refuses_ray(tmp_path):
    from evomerge.search.loop import Search

    data = {
        "merge": {"base_model": A, "models": [{"model": A}, {"model": B}]},
        "space": {"type": "dfs", "num_layers": 2},
        "fitness": {"tasks": [{"task": "t", "metric": "m", "heldout": None}]},
        "budget": {"evaluations": 4},
        "executor": "ray",
    }
    recipe = parse_search_recipe(data, "s.yaml")
    assert recipe.merge.merge_method == "passthrough"
    with pytest.raises(SearchError, match="serial executor"):
        Search.prepare(recipe, tmp_path)


@pytest.mark.slow
def test_dfs_search_beats_the_plain_frankenmerge_and_exports_what_it_scored(
    demo_family, tmp_path
):
    from evomerge.evals import Evaluator, load_candidate, prepare_suites
    from evomerge.search.config import load_search_recipe
    from evomerge.search.loop import Search

    expert_a, expert_b = str(demo_family / "expert_a"), str(demo_family / "expert_b")
    recipe_file = write_recipe(
        tmp_path / "dfs.yaml",
        demo_family,
        merge={
            "base_model": expert_a,
            "models": [{"model": expert_a}, {"model": expert_b}],
            "dtype": "float32",
        },
        space={"type": "dfs", "repeats": 2},
        fitness={
            "tasks": [
                {
                    "task": "demo_combined",
                    "metric": "exact_match",
                    "rows": "0:100",
                    "heldout": "demo_combined_heldout",
                }
            ],
            "batch_size": 100,
        },
        budget={"evaluations": 32},
        optimizer={"name": "CMA", "population": 8},
    )
    recipe = load_search_recipe(recipe_file)
    out = tmp_path / "out"
    summary = Search.prepare(recipe, out).run(echo=lambda _: None, progress=False)
    scores = {r.kind: r.heldout["demo_combined_heldout"] for r in summary.references}
    best, plain = scores["best"], scores["uniform"]
    assert best[0] - plain[0] > math.hypot(best[1], plain[1])
    # The exported checkpoint (scales folded into o_proj/down_proj) scores what the stacked
    # model scored in memory.
    candidate = load_candidate(out / "model", device="cpu")
    suites = prepare_suites(recipe.fitness)
    result = Evaluator(candidate.model, candidate.tokenizer, suites).score("heldout")
    assert result.scores[0].value == best[0]
    assert (out / "best_recipe.yaml").is_file() and (out / "report.md").is_file()
    done = mergekit_offline(out / "best_recipe.yaml", tmp_path / "mergekit", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_ps_then_dfs_runs_both_stages_and_compares_them(demo_family, tmp_path):
    from evomerge.search.config import load_search_recipe
    from evomerge.search.loop import Search

    recipe_file = write_recipe(
        tmp_path / "ps-dfs.yaml",
        demo_family,
        space={
            "type": "ps+dfs",
            "ps": {"parameters": {"weight": {}, "density": {"low": 0.1}}},
            "dfs": {"repeats": 1, "scale_form": "per_slot"},
        },
        budget={"evaluations": 8},
    )
    out = tmp_path / "out"
    recipe = load_search_recipe(recipe_file)
    summary = Search.prepare(recipe, out).run(echo=lambda _: None, progress=False)
    assert (out / "ps" / "model" / "config.json").is_file()
    assert (out / "dfs" / "model" / "evomerge_recipe.yaml").is_file()  # reproducible
    names = [r.name for r in summary.references]
    assert names[:2] == ["ps/model", "expert_a"]  # stage 2: the PS merge and the partner
    report = (out / "report.md").read_text()
    assert "| PS |" in report and "| PS+DFS |" in report
    assert ("**beats**" in report) != ("**does not beat**" in report)
