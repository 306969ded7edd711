"""Cheap fitness modes end to end on the demo family: each mode completes with fewer rows than
a full search and picks its best among full-set scores; racing with an Optuna pruner; minibatch
data-flow and IRT PS+DFS searches; and a racing search interrupted mid-candidate resumes to
exactly the uninterrupted run, scoring no chunk twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import content, trials_of

from evomerge.evals.evaluator import Evaluator
from evomerge.search.config import parse_search_recipe
from evomerge.search.loop import Search

REPO = Path(__file__).resolve().parents[1]
RACING = {"type": "racing", "z": 1.5, "chunk": 30}


def recipe_from(name: str, family: Path, mode, *, evaluations: int, population=None) -> dict:
    """recipes/NAME on `family` with fitness `mode` and a small budget."""
    data = yaml.safe_load((REPO / "recipes" / name).read_text())
    data = json.loads(json.dumps(data).replace("./demo/family", str(family)))
    data.pop("out")
    data["fitness"]["mode"] = mode
    data["budget"] = {"evaluations": evaluations}
    if population is not None:
        data["optimizer"]["population"] = population
    return data


def demo_recipe(family: Path, mode, *, evaluations: int = 24, **overrides) -> dict:
    """recipes/demo.yaml with a wider first generation (so racing meets hopeless candidates
    early)."""
    data = recipe_from("demo.yaml", family, mode, evaluations=evaluations)
    data["space"]["parameters"]["weight"]["sigma"] = 0.35
    data["space"]["parameters"]["density"]["sigma"] = 0.35
    return {**data, **overrides}


def search(data: dict, out: Path, **kwargs):
    recipe = parse_search_recipe(data, "test recipe", REPO)
    return Search.prepare(recipe, out).run(
        echo=lambda _: None, progress=False, write_model=False, **kwargs
    )


def check_cheap(out: Path, summary, mode: str) -> dict:
    data = json.loads((out / "summary.json").read_text())
    assert data["mode"] == mode and data["evaluations"] == len(summary.trials)
    assert data["rows_scored"] < data["rows_full_search"] == 300 * len(summary.trials)
    assert {"evaluations", "failed", "rows_scored", "wall_seconds", "best"} <= set(data)
    best = summary.best
    # The best was chosen on a full-set score: scored in full, or re-scored in full.
    assert best.outcome.full or best.number in summary.cost["rescored"]
    assert data["best"]["fitness"] == summary.cost["exact"][str(best.number)]
    exact = summary.cost["exact"]
    assert data["best"]["fitness"] == max(v for v in exact.values() if v is not None)
    assert data["best"]["heldout"] is not None and data["best"]["heldout_stderr"] > 0
    report = (out / "report.md").read_text()
    assert f"Mode **{mode}**" in report
    return data


@pytest.mark.parametrize(
    "mode",
    [RACING, {"type": "minibatch", "rows": 30}, {"type": "irt", "anchors": 30}],
    ids=["racing", "minibatch", "irt"],
)
def test_each_mode_scores_fewer_rows_and_picks_a_full_set_score(demo_family, tmp_path, mode):
    summary = search(demo_recipe(demo_family, mode), tmp_path / "out")
    data = check_cheap(tmp_path / "out", summary, mode["type"])
    trials = summary.trials
    if mode["type"] == "racing":
        assert data["stopped"] > 0
        for t in trials:  # a stopped trial saw whole chunks, the others every row
            assert t.outcome.full != t.outcome.stopped
            assert t.outcome.rows == 300 or (t.outcome.stopped and t.outcome.rows % 30 == 0)
    if mode["type"] == "minibatch":  # one subset per generation: the same size for everyone
        assert {t.outcome.rows for t in trials} == {30}
        assert len(summary.cost["rescored"]) == 3
    if mode["type"] == "irt":  # the first generation calibrates in full, then anchors only
        assert [t.outcome.rows for t in trials] == [300] * 8 + [30] * 16
        stored = trials_of(tmp_path / "out")[0].user_attrs
        assert len(stored["row_values"]["demo_mixed"]) == 300
        by_number = {t.number: t for t in trials}
        for number in summary.cost["rescored"]:  # estimates within their error bars
            estimate = by_number[number].outcome
            exact = summary.cost["exact"][str(number)]
            assert abs(estimate.fitness - exact) <= 2 * estimate.fitness_stderr


def test_racing_asks_the_optuna_pruner(demo_family, tmp_path):
    mode = {**RACING, "pruner": "MedianPruner", "pruner_options": {"n_startup_trials": 4}}
    optimizer = {"backend": "optuna", "name": "CmaEsSampler", "population": 8}
    summary = search(demo_recipe(demo_family, mode, optimizer=optimizer), tmp_path / "out")
    check_cheap(tmp_path / "out", summary, "racing")
    stopped = [t for t in trials_of(tmp_path / "out") if t.user_attrs.get("stopped")]
    assert stopped and all(t.intermediate_values for t in stopped)  # reported chunk by chunk


def test_minibatch_data_flow_search(demo_family, tmp_path):
    mode = {"type": "minibatch", "rows": 40}
    data = recipe_from("demo-dfs.yaml", demo_family, mode, evaluations=16, population=8)
    summary = search(data, tmp_path / "out")
    check_cheap(tmp_path / "out", summary, "minibatch")


def test_irt_ps_dfs_search(demo_family, tmp_path):
    mode = {"type": "irt", "anchors": 30}
    data = recipe_from("demo-ps-dfs.yaml", demo_family, mode, evaluations=8, population=4)
    recipe = parse_search_recipe(data, "test recipe", REPO)
    Search.prepare(recipe, tmp_path / "out").run(echo=lambda _: None, progress=False)
    for stage in ("ps", "dfs"):
        stats = json.loads((tmp_path / "out" / stage / "summary.json").read_text())
        assert stats["mode"] == "irt" and stats["rows_scored"] < stats["rows_full_search"]


class Interrupt(BaseException):
    """Stands in for a kill: not an Exception, so no candidate handler catches it."""


def test_racing_resumes_mid_candidate_without_losing_or_repeating_a_chunk(
    demo_family, tmp_path, monkeypatch
):
    data = demo_recipe(demo_family, RACING, evaluations=16)
    calls = {"n": 0, "stop_at": None}
    score = Evaluator.score

    def counted(self, split="fitness", rows=None):
        if split == "fitness" and rows is not None:
            calls["n"] += 1
            if calls["n"] == calls["stop_at"]:
                raise Interrupt
        return score(self, split, rows)

    monkeypatch.setattr(Evaluator, "score", counted)
    reference = search(data, tmp_path / "reference")
    uninterrupted = calls["n"]

    calls.update(n=0, stop_at=35)  # candidate 4 (0-based 3) is in its 5th of 10 chunks
    with pytest.raises(Interrupt):
        search(data, tmp_path / "killed")
    interrupted = calls["n"] - 1  # the interrupting call scored nothing
    assert 3 <= len(trials_of(tmp_path / "killed")) < 16
    calls.update(n=0, stop_at=None)
    resumed = search(data, tmp_path / "killed", resume=True)

    assert interrupted + calls["n"] == uninterrupted  # no chunk lost, none scored twice
    assert [content(t) for t in trials_of(tmp_path / "killed")] == [
        content(t) for t in trials_of(tmp_path / "reference")
    ]
    assert [t.outcome.rows for t in resumed.trials] == [t.outcome.rows for t in reference.trials]
    best = (tmp_path / "killed" / "best_recipe.yaml").read_text()
    assert best == (tmp_path / "reference" / "best_recipe.yaml").read_text()


def test_demo_cheap_is_the_demo_with_irt_and_its_dry_run_prices_it(monkeypatch, capsys):
    from helpers import run_cli

    demo = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    cheap = yaml.safe_load((REPO / "recipes" / "demo-cheap.yaml").read_text())
    assert cheap["fitness"].pop("mode") == {"type": "irt", "anchors": 30}
    assert cheap["fitness"].pop("rescore") == 3
    assert {**cheap, "out": None} == {**demo, "out": None}
    monkeypatch.chdir(REPO)
    code, out, _ = run_cli(["search", "recipes/demo-cheap.yaml", "--dry-run"], monkeypatch, capsys)
    # 8 x 300 calibrating, 142 x 30 anchors, 3 x 300 re-scored: what the benchmark measured
    assert code == 0 and "fitness mode irt: 7,560 of those 45,000 documents (16.8%" in out
