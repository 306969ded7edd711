"""The breeding strategies' operators (search/breeding.py) against hand-computed cases, and the
strategies' refusals. Their loop contract (seeded, resumable) is in test_optimizer_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import HashExecutor, run, write_recipe

from evomerge.search.breeding import (
    _layer_groups,
    _seed_genomes,
    attraction,
    cell_of,
    competition_fitness,
    insert_elite,
    replace_weakest,
    split_crossover,
)
from evomerge.search.config import load_search_recipe
from evomerge.search.loop import make_space


def test_competition_shares_each_row_among_those_that_solve_it():
    scores = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    # z = [2, 1, 1]: the first row is shared by two members, the others are each one's alone.
    assert competition_fitness(scores) == pytest.approx([1.5, 0.5, 1.0])
    assert competition_fitness(scores, alpha=0.0) == pytest.approx([2.0, 1.0, 1.0])  # plain GA
    # Continuous scores: a row is worth its best score (c_j = max_i s_ij), shared by the sum.
    soft = np.array([[0.5, 0.0], [0.25, 0.0]])
    assert competition_fitness(soft) == pytest.approx([0.5 * 0.5 / 0.75, 0.25 * 0.5 / 0.75])


def test_attraction_favours_partners_strong_where_the_first_parent_is_weak():
    scores = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    assert attraction(scores, 1) == pytest.approx([1.0, 0.0, 1.0])
    assert attraction(scores, 0) == pytest.approx([0.0, 0.0, 1.0])


def test_split_crossover_mixes_w_before_the_split_and_one_minus_w_after():
    a, b = np.array([0.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 0.0])
    groups = np.array([0, 1, 0, 1])
    child = split_crossover(a, b, groups, split=1, w=0.25)
    assert child == pytest.approx([0.75, 0.25, 0.25, 0.75])
    # Split 0: every gene after the split, all mixed with 1 - w.
    assert split_crossover(a, b, groups, split=0, w=0.25) == pytest.approx([0.25, 0.25, 0.75, 0.75])


def test_the_child_replaces_the_weakest_unless_it_is_the_weakest():
    archive = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert replace_weakest(archive, np.array([1.0, 1.0])) == 0  # equal members: the older goes
    assert replace_weakest(archive, np.array([0.0, 0.0])) is None
    archive = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert replace_weakest(archive, np.array([0.0, 0.0, 1.0])) == 1


def test_qd_cells_and_elites():
    assert cell_of([0.5], [0.0], [1.0], 5) == (2,)
    assert cell_of([1.0, -0.1], [0.0, 0.0], [1.0, 1.0], 5) == (4, 0)  # outside: the end bins
    archive: dict = {}
    assert insert_elite(archive, (2,), 0.4, member=0)  # an empty cell is filled
    assert not insert_elite(archive, (2,), 0.3, member=1)  # a weaker child does not enter
    assert not insert_elite(archive, (2,), 0.4, member=2)  # nor an equal one
    assert insert_elite(archive, (2,), 0.6, member=3) and archive == {(2,): (0.6, 3)}


def test_genome_layer_groups_and_warm_up_seeds(demo_family, tmp_path):
    space = make_space(load_search_recipe(write_recipe(tmp_path / "r.yaml", demo_family)))
    # weight and density for two experts, each in 2 groups of 2 layers (4-layer models).
    assert list(_layer_groups(space)) == [0, 1] * 4
    seeds = _seed_genomes(space)
    names = [g.name for g in space.genes]
    expert_a = dict(zip(names, seeds[0], strict=True))
    assert expert_a["weight.expert_a.layers0-1"] == 1.0
    assert expert_a["weight.expert_b.layers2-3"] == 0.0
    assert expert_a["density.expert_a.layers0-1"] == 0.5  # other parameters at their start
    assert seeds[-1] == space.init()  # the uniform merge


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": {"name": "cycle_qd"}}, "cycle_qd needs at least two fitness tasks"),
        ({"optimizer": {"name": "natural_niches", "options": {"archive": 1}}}, "at least 2"),
        ({"optimizer": {"name": "natural_niches", "options": {"alpha": "x"}}}, "not a number"),
        ({"optimizer": {"name": "natural_niches", "options": {"arhcive": 3}}}, "accepted: alpha"),
        ({"optimizer": {"name": "natural_niches"}, "space": {"type": "dfs"}}, "parameter space"),
    ],
)
def test_strategy_refusals(demo_family, tmp_path, change, message):
    from evomerge.search.errors import SearchError
    from evomerge.search.loop import preflight

    recipe = load_search_recipe(write_recipe(tmp_path / "r.yaml", demo_family, **change))
    with pytest.raises(SearchError, match=message):
        preflight(recipe)


def test_natural_niches_breeds_from_its_archive(demo_family, tmp_path):
    """After the warm-up (the sources, the uniform merge, random genomes) every child lies
    between two archive members, gene group by gene group (no mutation by default)."""
    optimizer = {"name": "natural_niches", "population": 4, "options": {"archive": 6}}
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, optimizer=optimizer,
                          budget={"evaluations": 20})  # fmt: skip
    summary = run(recipe, tmp_path / "out", write_model=False,
                  executor=HashExecutor(["demo_combined"]))  # fmt: skip
    trials = summary.trials
    space = make_space(load_search_recipe(recipe))
    seeds = _seed_genomes(space)
    assert [t.genome for t in trials[: len(seeds)]] == seeds
    assert all(t.outcome.row_values for t in trials)  # per-row scores, as competition needs
    genomes = np.array([t.genome for t in trials])
    for child in genomes[8:]:
        assert any(
            np.all((np.minimum(a, b) - 1e-9 <= child) & (child <= np.maximum(a, b) + 1e-9))
            for a in genomes for b in genomes
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["natural_niches", "cycle_qd"])
def test_a_strategys_best_recipe_rebuilds_the_model_it_scored(name, demo_family, tmp_path):
    """On the demo family with the real executor: the best trial's recipe, merged by `evomerge
    merge`, is the model the search wrote, and scores what the search reported for it."""
    from helpers import load_weights
    from test_optimizer_contract import TWO_TASKS

    from evomerge.evals import Evaluator, load_candidate, prepare_suites
    from evomerge.merge.materialize import run_merge
    from evomerge.merge.recipe import load_recipe

    optimizer = {"name": name, "population": 4, "options": {"warmup": 4}}
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, optimizer=optimizer, fitness=TWO_TASKS,
                          budget={"evaluations": 12}, baselines=[])  # fmt: skip
    out = tmp_path / "out"
    summary = run(recipe, out)
    run_merge(load_recipe(out / "best_recipe.yaml"), tmp_path / "again", device="cpu", seed=3)
    written, again = load_weights(out / "model"), load_weights(tmp_path / "again")
    assert written.keys() == again.keys()
    assert all(torch.equal(written[k], again[k]) for k in written)
    candidate = load_candidate(out / "model", device="cpu")
    spec = load_search_recipe(recipe).fitness
    result = Evaluator(candidate.model, candidate.tokenizer, prepare_suites(spec)).score("fitness")
    assert result.fitness == summary.best.outcome.fitness
