"""The search report: files written, tables, the held-out verdict both ways, edge cases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from evomerge.search.records import Gene, ModelScores, Outcome, SearchSummary, TrialRecord
from evomerge.search.report import heldout_verdict, time_split, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OBJECTIVES = ["skill_a", "skill_b"]


def gene(param: str, model: str | None, layers: tuple[int, int] | None, filt: str | None = None):
    name = f"{param}.{model}.{filt}.{layers}"
    return Gene(name, param, model, filt, layers, low=0.0, high=1.0, init=0.5, sigma=0.1)


GENES = [
    gene("weight", "expert_a", (0, 2)),
    gene("weight", "expert_a", (2, 4)),
    gene("weight", "expert_b", (0, 2), "self_attn"),
    gene("weight", "expert_b", (2, 4), "self_attn"),
    gene("density", None, None),
]


def trial(number: int, generation: int, fitness: float | None, error: str | None = None):
    scores = {} if fitness is None else {"skill_a": fitness, "skill_b": 1.0 - fitness}
    seconds = {"materialize": 1.0, "evaluate": 3.0, "optimizer": 0.0}
    outcome = Outcome(fitness, 0.01, scores, error=error, seconds=seconds)
    genome = [(0.1 * number + 0.23 * i) % 1.0 for i in range(len(GENES))]
    return TrialRecord(number, generation, genome, outcome, f"h{number}")


def ref(name: str, kind: str, fit: float, a: tuple, b: tuple, **totals) -> ModelScores:
    fitness = {"skill_a": (fit, 0.02), "skill_b": (fit, None)}
    return ModelScores(name, kind, fitness, {"skill_a": a, "skill_b": b}, **totals)


def references(best_a: float, best_stderr: float | None = 0.01) -> list[ModelScores]:
    return [
        ref("expert_a", "source", 0.6, (0.80, 0.02), (0.30, 0.02), cost=0),
        ref("expert_b", "source", 0.5, (0.40, 0.02), (0.90, 0.02), cost=0),
        ref("uniform", "uniform", 0.55, (0.60, 0.02), (0.60, 0.02), fitness_total=0.55),
        ref("best", "best", 0.7, (best_a, best_stderr), (0.95, 0.01), fitness_total=0.7,
            heldout_total=0.9, heldout_total_stderr=0.01, cost=7),
    ]


def summary(**changes) -> SearchSummary:
    trials = [
        trial(0, 0, 0.50), trial(1, 0, 0.55), trial(2, 0, None, "CUDA out of memory at layer 3"),
        trial(3, 1, 0.60), trial(4, 1, 0.58), trial(5, 2, 0.70), trial(6, 2, 0.65),
    ]  # fmt: skip
    base = SearchSummary(
        title="Demo search",
        genes=GENES,
        trials=trials,
        best=trials[5],
        references=references(0.90),
        objectives=OBJECTIVES,
        pareto=[5, 6],
        best_recipe_yaml="merge_method: linear\nmodels: []\n",
        settings={"optimizer": "cmaes", "budget": 7, "seed": 0, "device": "cpu"},
    )
    return replace(base, **changes)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def test_writes_all_files_and_tables(tmp_path: Path) -> None:
    report = write_report(summary(), tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    for name in ("fitness.png", "best_parameters.png", "scores.png", "pareto.png"):
        assert_png(tmp_path / "out" / name)
    text = report.read_text()
    assert text.startswith("# Demo search")
    assert "| optimizer | cmaes |" in text
    assert (
        "| best | best | 7 | 0.7000 ± 0.0200 | 0.7000 | 0.7000 | 0.9000 ± 0.0100 | 0.9500 ± 0.0100"
        " | 0.9000 ± 0.0100 |" in text
    )
    assert "| expert_a | source | 0 | 0.6000 ± 0.0200" in text
    assert "| uniform | uniform | - | 0.5500 ± 0.0200 | 0.5500 | 0.5500 | 0.6000 ± 0.0200" in text
    assert "6 completed, 1 failed." in text
    assert "- trial 2 (generation 0): CUDA out of memory at layer 3" in text
    assert "Trial 5 (generation 2), fitness 0.7000 ± 0.0100." in text
    assert "```yaml\nmerge_method: linear\nmodels: []\n```" in text
    assert "| 5 | 0.7000 | 0.3000 |" in text and "| 6 | 0.6500 | 0.3500 |" in text
    for name in ("fitness.png", "best_parameters.png", "scores.png", "pareto.png"):
        assert f"]({name})" in text


def test_time_split(tmp_path: Path) -> None:
    assert time_split(summary().trials) == [
        ("materialize", 1.0, 0.25), ("evaluate", 3.0, 0.75), ("optimizer", 0.0, 0.0),
    ]  # fmt: skip
    text = write_report(summary(), tmp_path).read_text()
    assert "| materialize | 1.00 | 25% |" in text and "| evaluate | 3.00 | 75% |" in text


def test_beats_every_reference(tmp_path: Path) -> None:
    # best skill_a 0.90 vs expert_a 0.80: difference 0.10 > sqrt(0.01² + 0.02²) ≈ 0.022
    assert heldout_verdict(references(0.90)) == (True, [])
    # 0.825 - 0.80 = 0.025 > 0.0224: the stderrs combine in quadrature, not by plain sum (0.03)
    assert heldout_verdict(references(0.825)) == (True, [])
    text = write_report(summary(), tmp_path).read_text()
    assert "The best merge **beats** every other model above on each held-out entry" in text
    assert "does not beat" not in text


@pytest.mark.parametrize(
    ("best_a", "best_stderr", "count", "why"),
    [
        (0.82, 0.01, 1, "skill_a: 0.8200 vs expert_a 0.8000 (difference +0.0200"),  # < 0.0224
        (0.79, 0.01, 1, "skill_a: 0.7900 vs expert_a 0.8000 (difference -0.0100"),
        (0.90, None, 3, "skill_a: 0.9000 vs expert_a 0.8000, stderr unknown"),
    ],
)
def test_does_not_beat(
    tmp_path: Path, best_a: float, best_stderr: float | None, count: int, why: str
) -> None:
    verdict, shortfalls = heldout_verdict(references(best_a, best_stderr))
    assert verdict is False and len(shortfalls) == count and shortfalls[0].startswith(why)
    text = write_report(summary(references=references(best_a, best_stderr)), tmp_path).read_text()
    assert "The best merge **does not beat** every other model above on each held-out entry" in text
    assert f"- {why}" in text
    assert "**beats**" not in text


def test_no_completed_trials_and_no_references(tmp_path: Path) -> None:
    trials = [trial(0, 0, None, "boom"), trial(1, 0, None, "bang")]
    text = write_report(
        summary(trials=trials, best=None, references=[], pareto=[], best_recipe_yaml=""), tmp_path
    ).read_text()
    assert_png(tmp_path / "fitness.png")
    for name in ("best_parameters.png", "scores.png", "pareto.png"):
        assert not (tmp_path / name).exists()
        assert f"]({name})" not in text
    assert "0 completed, 2 failed." in text and "No trial completed." in text
    assert "- trial 1 (generation 0): bang" in text
    assert "No reference scores." in text and "No best trial." in text


def test_no_best_reference(tmp_path: Path) -> None:
    refs = references(0.9)[:3]
    assert heldout_verdict(refs) == (None, [])
    text = write_report(summary(references=refs), tmp_path).read_text()
    assert "No held-out comparison" in text and "**beats**" not in text
    assert "does not beat" not in text
    assert_png(tmp_path / "scores.png")


def test_single_generation_single_objective(tmp_path: Path) -> None:
    trials = [trial(0, 0, 0.4), trial(1, 0, 0.5)]
    write_report(summary(trials=trials, best=trials[1], objectives=["fit"], pareto=[]), tmp_path)
    assert_png(tmp_path / "fitness.png")
    assert_png(tmp_path / "best_parameters.png")
    assert not (tmp_path / "pareto.png").exists()
    text = (tmp_path / "report.md").read_text()
    assert "0 failed." in text and "First failures" not in text and "## Pareto front" not in text


def test_deterministic(tmp_path: Path) -> None:
    write_report(summary(), tmp_path / "a")
    write_report(summary(), tmp_path / "b")
    for name in ("report.md", "fitness.png", "best_parameters.png", "scores.png", "pareto.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
