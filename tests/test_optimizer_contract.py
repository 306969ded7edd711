"""The contract every optimizer and breeding strategy keeps with the search loop, checked with a
hash-scored executor (no model, no lm-eval; as Optuna's sampler tests do): the same seed gives
the same trials, and a search stopped after some generations and resumed gives the trials of an
uninterrupted one."""

from __future__ import annotations

import pytest
from helpers import HashExecutor, content, trials_of, write_recipe

from evomerge.search.config import load_search_recipe
from evomerge.search.fitness import FitnessPolicy, FitnessRows
from evomerge.search.journal import Journal, recipe_hash
from evomerge.search.loop import Search
from evomerge.search.optimizers import make_optimizer

OPTIMIZERS = [
    {"name": "CMA", "population": 4},
    {"name": "NGOpt", "population": 4},
    {"name": "TwoPointsDE", "population": 4},
    {"name": "PSO", "population": 4},
    {"name": "RandomSearch", "population": 4},
    {"backend": "optuna", "name": "TPESampler", "population": 4},
    {"backend": "optuna", "name": "CmaEsSampler", "population": 4},
    {"backend": "optuna", "name": "RandomSampler", "population": 4},
    {"name": "natural_niches", "population": 4, "options": {"archive": 5}},
    {"name": "cycle_qd", "population": 4, "options": {"bins": 3}},
]


TWO_TASKS = {
    "tasks": [
        {"task": task, "metric": "exact_match", "rows": "0:60",
         "heldout": {"task": f"{task}_heldout", "rows": "0:60"}}
        for task in ("demo_skill_a", "demo_skill_b")
    ],
}  # fmt: skip


def contract_recipe(path, family, optimizer):
    """A demo search recipe for `optimizer` (cycle_qd gets two fitness tasks)."""
    extra = {"fitness": TWO_TASKS} if optimizer["name"] == "cycle_qd" else {}
    return write_recipe(path, family, optimizer=optimizer, **extra)


def search_to(recipe_path, out, evaluations: int, *, resume: bool) -> HashExecutor:
    """The loop of `Search.run` alone, with the hash-scored executor (full tickets)."""
    recipe = load_search_recipe(recipe_path)
    recipe = recipe.model_copy(
        update={"budget": recipe.budget.model_copy(update={"evaluations": evaluations})}
    )
    search = Search.prepare(recipe, out)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(
        search.storage,
        recipe.study_name,
        search.space.genes,
        search.objectives,
        recipe.fingerprint(),
        resume=resume,
    )
    optimizer = make_optimizer(
        search.space, recipe.optimizer, journal, budget=evaluations, seed=recipe.seed
    )
    executor = HashExecutor(search.objectives)
    rows = FitnessRows({t: list(range(60)) for t in search.objectives},
                       dict.fromkeys(search.objectives, 1.0))  # fmt: skip
    policy = FitnessPolicy(rows, journal, recipe.seed, 0)
    search._loop(journal, optimizer, executor, echo=lambda _: None, progress=False, policy=policy)
    return executor


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o["name"])
def test_the_same_seed_gives_the_same_trials(optimizer, demo_family, tmp_path):
    recipe = contract_recipe(tmp_path / "r.yaml", demo_family, optimizer)
    search_to(recipe, tmp_path / "a", 12, resume=False)
    search_to(recipe, tmp_path / "b", 12, resume=False)
    first, second = trials_of(tmp_path / "a"), trials_of(tmp_path / "b")
    assert [content(t) for t in first] == [content(t) for t in second]
    assert len(first) == 12 and len({tuple(sorted(t.params.items())) for t in first}) > 1


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o["name"])
def test_resuming_equals_an_uninterrupted_run(optimizer, demo_family, tmp_path):
    recipe = contract_recipe(tmp_path / "r.yaml", demo_family, optimizer)
    search_to(recipe, tmp_path / "whole", 12, resume=False)
    search_to(recipe, tmp_path / "parts", 4, resume=False)
    resumed = search_to(recipe, tmp_path / "parts", 12, resume=True)
    assert resumed.evaluated == 8  # finished trials are neither lost nor repeated
    whole, parts = trials_of(tmp_path / "whole"), trials_of(tmp_path / "parts")
    assert [content(t) for t in parts] == [content(t) for t in whole]


@pytest.mark.parametrize("optimizer", [o for o in OPTIMIZERS if o.get("backend") == "optuna"],
                         ids=lambda o: o["name"])  # fmt: skip
def test_a_kill_while_a_trial_is_drawn_resumes_to_the_uninterrupted_run(
    optimizer, demo_family, tmp_path, monkeypatch
):
    """Optuna stores a trial's parameters one by one: a search killed between two of them leaves
    a running trial with some parameters. `--resume` draws the rest as the killed process would
    have, evaluates it, and finishes with the trials of an uninterrupted run."""
    import optuna

    recipe = contract_recipe(tmp_path / "r.yaml", demo_family, optimizer)
    search_to(recipe, tmp_path / "whole", 12, resume=False)
    suggest = optuna.trial.Trial.suggest_float

    def killed_on_the_third_gene_of_trial_5(trial, name, *args, **kwargs):
        if trial.number == 5 and sum(1 for _ in trial.params) == 2:
            raise KeyboardInterrupt  # as SIGKILL would: the trial stays RUNNING, half-drawn
        return suggest(trial, name, *args, **kwargs)

    monkeypatch.setattr(optuna.trial.Trial, "suggest_float", killed_on_the_third_gene_of_trial_5)
    with pytest.raises(KeyboardInterrupt):
        search_to(recipe, tmp_path / "parts", 12, resume=False)
    monkeypatch.setattr(optuna.trial.Trial, "suggest_float", suggest)
    half = [t for t in trials_of(tmp_path / "parts") if t.number == 5]
    assert len(half[0].params) == 2
    search_to(recipe, tmp_path / "parts", 12, resume=True)
    whole, parts = trials_of(tmp_path / "whole"), trials_of(tmp_path / "parts")
    assert [content(t) for t in parts] == [content(t) for t in whole]


def test_the_recorded_recipe_is_the_evaluated_one(demo_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", demo_family)
    search_to(recipe, tmp_path / "a", 4, resume=False)
    space = Search.prepare(load_search_recipe(recipe), tmp_path / "x").space
    for trial in trials_of(tmp_path / "a"):
        genome = [trial.params[g.name] for g in space.genes]
        assert trial.user_attrs["recipe"] == recipe_hash(space.to_recipe(genome))
