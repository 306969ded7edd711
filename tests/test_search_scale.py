"""Scaling out: candidates on Ray workers, and several searchers sharing one study in
PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import content, run, trials_of, write_recipe

from evomerge.search.config import load_search_recipe
from evomerge.search.loop import Search

REPO = Path(__file__).resolve().parents[1]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [{"name": "CMA", "population": 4},
                                       {"name": "natural_niches", "population": 4}])  # fmt: skip
def test_ray_workers_give_the_serial_executors_trials(optimizer, demo_family, tmp_path, local_ray):
    serial = write_recipe(tmp_path / "serial.yaml", demo_family, optimizer=optimizer)
    run(serial, tmp_path / "serial", write_model=False)
    parallel = write_recipe(tmp_path / "ray.yaml", demo_family, executor="ray", workers=2,
                            optimizer=optimizer)  # fmt: skip
    summary = run(parallel, tmp_path / "ray", write_model=False)
    assert [content(t) for t in trials_of(tmp_path / "ray")] == [
        content(t) for t in trials_of(tmp_path / "serial")
    ]
    assert len(summary.trials) == 16


@pytest.mark.slow
def test_a_killed_worker_loses_no_trial(demo_family, tmp_path, local_ray):
    from evomerge.search.ray_executor import RayExecutor

    recipe_path = write_recipe(tmp_path / "s.yaml", demo_family, budget={"evaluations": 12})
    recipe = load_search_recipe(recipe_path)
    search = Search.prepare(recipe, tmp_path / "out")

    class KillOnce(RayExecutor):
        killed = False

        def evaluate(self, recipes, tickets):
            for i, outcome in enumerate(super().evaluate(recipes, tickets)):
                if i == 1 and not self.killed:  # mid-generation, with work in flight
                    os.kill(self.pids[0], signal.SIGKILL)
                    KillOnce.killed = True
                yield outcome

    executor = KillOnce(
        search.space.to_recipe(search.space.init()), recipe.fitness, device="cpu", workers=2
    )
    first_pid = executor.pids[0]
    summary = search.run(echo=lambda _: None, progress=False, executor=executor, write_model=False)
    trials = trials_of(tmp_path / "out")
    assert KillOnce.killed and executor.pids[0] != first_pid  # Ray restarted it
    assert [t.number for t in trials] == list(range(12))
    assert all(t.state.name == "COMPLETE" for t in trials), [t.user_attrs for t in trials]
    assert summary.best is not None


@pytest.mark.slow
def test_two_searchers_share_one_postgresql_study(demo_family, tmp_path, postgres_url):
    recipe = write_recipe(
        tmp_path / "shared.yaml",
        demo_family,
        budget={"evaluations": 48},
        optimizer={"backend": "optuna", "name": "TPESampler", "population": 4},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "evomerge", "search", str(recipe), "--out", str(tmp_path / name),
             "--storage", postgres_url, "--resume"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
    study = optuna.load_study(study_name="evomerge", storage=postgres_url)
    trials = study.get_trials()
    assert all(t.state.name == "COMPLETE" for t in trials)  # none lost, none left running
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert 48 <= len(trials) <= 48 + 2 * 4  # each searcher may finish the generation it began
    genomes = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(genomes)) == len(genomes)  # no candidate evaluated twice
    owners = {t.user_attrs["owner"] for t in trials}
    assert len(owners) == 2  # both searchers did work


@pytest.mark.slow
def test_nevergrad_refuses_a_study_another_searcher_is_using(demo_family, tmp_path, postgres_url):
    import time

    from evomerge.search.errors import SearchError

    recipe = write_recipe(tmp_path / "ng.yaml", demo_family, budget={"evaluations": 4})
    storage = postgres_url
    search = Search.prepare(load_search_recipe(recipe), tmp_path / "a", storage=storage)
    optuna.create_study(storage=storage, study_name="evomerge-ng", directions=["maximize"])
    study = optuna.load_study(study_name="evomerge-ng", storage=storage)
    study.set_user_attr("heartbeat.someoneelse", time.time())
    search.recipe = search.recipe.model_copy(update={"study_name": "evomerge-ng"})
    with pytest.raises(SearchError, match="another searcher"):
        search.run(resume=True, echo=lambda _: None, progress=False, write_model=False)
