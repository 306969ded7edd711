"""The search loop: end to end on the trained demo family (the README's seeds, kill and resume,
failed candidates), and its journal contracts (resume rules, reruns, the Pareto front, the
wall-clock budget) with a hash-scored executor that builds no model."""

from __future__ import annotations

import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    EACH_BACKEND,
    HashExecutor,
    content,
    mergekit_offline,
    run,
    trials_of,
    write_recipe,
)

from evomerge.search.config import load_search_recipe
from evomerge.search.errors import SearchError
from evomerge.search.loop import Search

REPO = Path(__file__).resolve().parents[1]


def readme_demo_tables() -> tuple[dict[str, tuple[float, float]], dict[int, tuple[str, str]]]:
    """The README's demo tables: held-out (value, stderr) per source model, and per seed the
    uniform and evolved merge's cells as printed ('0.890 ± 0.013')."""
    text = (REPO / "README.md").read_text()
    demo_table = text.split("| model | held-out, addition and Roman numerals ± stderr |")[1]
    demo_table = demo_table.split("\n\n")[0]
    cell = r"(\d\.\d{3}) ± (\d\.\d{3})"
    row = rf"^\| (base|expert_a|expert_b)\b[^|]* \| {cell} \|$"
    sources = {
        name: (float(v), float(s)) for name, v, s in re.findall(row, demo_table, re.M)
    }
    seed_table = text.split("| `seed:` | uniform merge | evolved merge |")[1].split("\n\n")[0]
    seeds = {
        int(seed): (uniform, evolved)
        for seed, uniform, evolved in re.findall(
            r"^\| (\d+) \| (\d\.\d{3} ± \d\.\d{3}) \| (\d\.\d{3} ± \d\.\d{3}) \|", seed_table, re.M
        )
    }
    return sources, seeds


README_SOURCES, README_SEEDS = readme_demo_tables()


def readme_hand_table() -> dict[int, dict[str, str]]:
    """The README's hand-recipe rows of the demo: per seed, each hand baseline's held-out cell."""
    text = (REPO / "README.md").read_text()
    table = text.split("| `seed:` | task_arithmetic (weight 1) |")[1].split("\n\n")[0]
    names = ["task_arithmetic (weight 1)", "ties (weight 1, density 0.5)",
             "dare_ties (weight 1, density 0.5)"]  # fmt: skip
    cell = r"(\d\.\d{3} ± \d\.\d{3})"
    return {
        int(seed): dict(zip(names, cells, strict=True))
        for seed, *cells in re.findall(rf"^\| (\d+) \| {cell} \| {cell} \| {cell} \|", table, re.M)
    }


README_HAND = readme_hand_table()


def printed(value: tuple[float, float | None]) -> str:
    return f"{value[0]:.3f} ± {value[1] or 0:.3f}"


def test_the_readme_has_its_demo_tables():
    assert set(README_SOURCES) == {"base", "expert_a", "expert_b"}
    assert len(README_SEEDS) >= 3 and sorted(README_HAND) == sorted(README_SEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", sorted(README_SEEDS))
def test_demo_search_beats_sources_and_uniform_merge(seed, tmp_path, monkeypatch):
    """recipes/demo.yaml as the README runs it (from the repository root, on the shipped family):
    at every seed the README reports, the evolved merge wins on held-out data."""
    monkeypatch.chdir(REPO)
    recipe = load_search_recipe(REPO / "recipes" / "demo.yaml")
    recipe = recipe.model_copy(update={"seed": seed})
    summary = Search.prepare(recipe, tmp_path / "runs" / "demo").run(
        echo=lambda _: None, progress=False
    )
    out = tmp_path / "runs" / "demo"
    scores = {r.name: r for r in summary.references}
    best = scores["best merge"].heldout["demo_mixed_heldout"]
    for name in ("expert_a", "expert_b", "base", "uniform merge"):
        other = scores[name].heldout["demo_mixed_heldout"]
        margin = math.hypot(best[1], other[1])
        assert best[0] - other[0] > margin, (name, best, other)
    # The README's tables are what this run measured.
    for name, (value, stderr) in README_SOURCES.items():
        assert printed(scores[name].heldout["demo_mixed_heldout"]) == f"{value:.3f} ± {stderr:.3f}"
    uniform = scores["uniform merge"].heldout["demo_mixed_heldout"]
    assert (printed(uniform), printed(best)) == README_SEEDS[seed]
    # The written model is the evaluated one, and both merge tools accept the recipe.
    from mergekit.config import MergeConfiguration

    text = (out / "best_recipe.yaml").read_text()
    MergeConfiguration.model_validate(yaml.safe_load(text))
    from evomerge.evals import Evaluator, load_candidate, prepare_suites

    candidate = load_candidate(out / "model", device="cpu")
    result = Evaluator(candidate.model, candidate.tokenizer, prepare_suites(recipe.fitness)).score(
        "heldout"
    )
    assert result.scores[0].value == best[0]
    assert (out / "model" / "README.md").is_file()
    report = (out / "report.md").read_text()
    # The report's verdict also weighs the hand recipes (the default baselines), which the
    # README's table reports beside the search (at every seed: README_HAND).
    hand = {r.name: r.heldout["demo_mixed_heldout"] for r in summary.references if r.kind == "hand"}
    assert {name: printed(v) for name, v in hand.items()} == README_HAND[seed]
    beaten = all(best[0] - v[0] > math.hypot(best[1], v[1]) for v in hand.values())
    assert ("**beats**" if beaten else "**does not beat**") in report
    assert (out / "fitness.png").stat().st_size > 0
    assert len(trials_of(out)) == recipe.budget.evaluations
    # Every candidate took the fast greedy path (a silent fall-back is ~3x slower).
    assert f"fast greedy path (evals/greedy.py) for all {len(summary.trials)}" in report
    assert all(t.outcome.decoding == "fast greedy" for t in summary.trials)
    assert "./demo/family/expert_a" in text  # local paths marked as such
    if seed == README_SEEDS[0]:  # mergekit-yaml rebuilds it offline (no Hub lookups)
        done = mergekit_offline(out / "best_recipe.yaml", tmp_path / "mergekit", REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "mergekit" / "model.safetensors").is_file()


def _search_process(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge", "search", str(recipe), "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finished_count(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            (n,) = conn.execute(
                "select count(*) from trials where state in ('COMPLETE', 'FAIL')"
            ).fetchone()
            return n
    except sqlite3.OperationalError:  # tables not created yet
        return 0


@pytest.mark.slow
@EACH_BACKEND
def test_sigkill_and_resume_equals_an_uninterrupted_run(demo_family, tmp_path, optimizer):
    recipe = write_recipe(tmp_path / "search.yaml", demo_family, optimizer=optimizer)
    reference = tmp_path / "reference"
    run(recipe, reference, write_model=False)

    killed = tmp_path / "killed"
    proc = _search_process(recipe, killed)
    deadline = time.monotonic() + 240
    while _finished_count(killed / "study.db") < 6:
        assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the search made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = _finished_count(killed / "study.db")
    assert 6 <= interrupted_at < 16

    resumed = _search_process(recipe, killed, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming: {interrupted_at} finished trials" in output

    expected = [content(t) for t in trials_of(reference)]
    assert [content(t) for t in trials_of(killed)] == expected
    assert len(expected) == 16
    best = yaml.safe_load((killed / "best_recipe.yaml").read_text())
    assert best == yaml.safe_load((reference / "best_recipe.yaml").read_text())


def hashed(**kwargs):
    """A search's keyword arguments with a hash-scored executor (no model is built)."""
    return {"write_model": False, "executor": HashExecutor(["demo_combined"]), **kwargs}


def test_existing_study_needs_resume_and_the_same_recipe(demo_family, tmp_path):
    recipe = write_recipe(tmp_path / "a.yaml", demo_family, budget={"evaluations": 2})
    out = tmp_path / "out"
    run(recipe, out, **hashed())
    with pytest.raises(SearchError, match="--resume"):
        run(recipe, out, **hashed())
    changed = write_recipe(tmp_path / "b.yaml", demo_family, budget={"evaluations": 2}, seed=9)
    with pytest.raises(SearchError, match="different search recipe"):
        run(changed, out, **hashed(resume=True))
    # A longer budget is not a different search: resuming extends it.
    longer = write_recipe(tmp_path / "c.yaml", demo_family, budget={"evaluations": 4})
    executor = HashExecutor(["demo_combined"])
    summary = run(longer, out, resume=True, write_model=False, executor=executor)
    assert len(summary.trials) == 4
    assert executor.evaluated == 2  # only the two new trials ran


class BrokenExecutor:
    """An executor that fails before any candidate is scored (a crash at start-up)."""

    def evaluate(self, recipes, tickets):
        raise RuntimeError("the device went away")
        yield  # a generator, like the real ones

    def score(self, recipe, split):
        raise AssertionError("not reached")

    def close(self):
        pass


def test_a_search_that_stopped_before_its_first_trial_can_be_rerun(demo_family, tmp_path):
    recipe = write_recipe(tmp_path / "a.yaml", demo_family, budget={"evaluations": 2})
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="went away"):
        run(recipe, out, write_model=False, executor=BrokenExecutor())
    assert (out / "study.db").is_file() and trials_of(out) == []
    summary = run(recipe, out, **hashed())  # no --resume needed: nothing to resume
    assert len(summary.trials) == 2


@pytest.mark.slow
def test_a_second_search_on_the_same_folder_is_refused(demo_family, tmp_path):
    """While one search writes OUT (its lock held here), another `evomerge search` on OUT exits 2
    with one line and adds nothing to the study."""
    from evomerge.search.lock import output_lock

    recipe = write_recipe(tmp_path / "a.yaml", demo_family, budget={"evaluations": 2})
    out = tmp_path / "out"
    with output_lock(out):
        done = _search_process(recipe, out)
        output, _ = done.communicate(timeout=120)
    assert done.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "another evomerge search" in errors[0], output
    assert "Traceback" not in output and not (out / "study.db").exists()


@pytest.mark.slow
def test_failing_candidates_are_recorded_and_the_search_completes(
    demo_family, tmp_path, monkeypatch
):
    """Every third candidate gets a NaN weight (as a diverging merge would); one raises OOM."""
    from evomerge.merge.resident import ResidentMerger

    original = ResidentMerger.materialize
    calls = {"n": 0}

    def flaky(self, model, recipe=None):
        original(self, model, recipe)
        calls["n"] += 1  # call 1 builds the model; calls 2-13 are the 12 candidates
        if calls["n"] % 3 == 0 and calls["n"] <= 13:
            next(model.parameters()).data[0, 0] = float("nan")
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(ResidentMerger, "materialize", flaky)
    recipe = write_recipe(tmp_path / "s.yaml", demo_family, budget={"evaluations": 12})
    summary = run(recipe, tmp_path / "out", write_model=False)
    failed = [t for t in summary.trials if t.outcome.failed]
    assert [t.number for t in failed] == [1, 3, 4, 7, 10]
    assert all("non-finite" in t.outcome.error for t in failed if t.number != 3)
    assert "OutOfMemoryError" in failed[1].outcome.error
    states = [t.state.name for t in trials_of(tmp_path / "out")]
    assert states.count("FAIL") == 5 and len(states) == 12
    assert summary.best is not None and not summary.best.outcome.failed
    assert "non-finite" in (tmp_path / "out" / "report.md").read_text()


def test_nsga2_multi_objective_writes_the_pareto_front(demo_family, tmp_path):
    fitness = {
        "tasks": [
            {"task": "demo_skill_a", "metric": "exact_match", "rows": "0:40", "heldout": None},
            {"task": "demo_skill_b", "metric": "exact_match", "rows": "0:40", "heldout": None},
        ],
        "batch_size": 40,
    }
    recipe = write_recipe(
        tmp_path / "mo.yaml",
        demo_family,
        fitness=fitness,
        budget={"evaluations": 8},
        optimizer={"backend": "optuna", "name": "NSGAIISampler", "population": 4},
    )
    executor = HashExecutor(["demo_skill_a", "demo_skill_b"])
    summary = run(recipe, tmp_path / "out", write_model=False, executor=executor)
    trials = trials_of(tmp_path / "out")
    assert all(len(t.values) == 2 for t in trials)
    assert summary.pareto and summary.best.number in summary.pareto
    for number in summary.pareto:
        assert (tmp_path / "out" / "pareto" / f"trial-{number}.yaml").is_file()
    front = {tuple(t.values) for t in trials if t.number in summary.pareto}
    for t in trials:  # nothing outside the front dominates a point on it
        for point in front:
            dominates = all(a >= b for a, b in zip(t.values, point, strict=True))
            assert not (dominates and tuple(t.values) != point)


def test_wall_clock_budget_stops_between_generations(demo_family, tmp_path):
    recipe = write_recipe(tmp_path / "t.yaml", demo_family, budget={"seconds": 0.01})
    executor = HashExecutor(["demo_combined"], seconds=0.01)  # a generation outlasts the budget
    summary = run(recipe, tmp_path / "out", write_model=False, executor=executor)
    assert len(summary.trials) == 4  # the first generation runs whole, then the clock stops it
