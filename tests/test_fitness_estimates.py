"""The statistics behind the cheap fitness modes, on synthetic rows (no model): subset estimates
and their standard errors, racing's stopping rule against a generation's recorded full scores,
and the IRT estimate's error bar on candidates it was not calibrated on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.evals import irt
from evomerge.evals.errors import EvalError
from evomerge.evals.estimate import subset_estimate
from evomerge.evals.modes import RacingMode
from evomerge.evals.results import EvalResult
from evomerge.evals.spec import parse_fitness_spec
from evomerge.search.errors import SearchError
from evomerge.search.fitness import FitnessRows, RacingPolicy, check_mode
from evomerge.search.optimizers import Proposal


def test_subset_estimates_are_exact_on_every_row_and_honest_on_some():
    rng = np.random.default_rng(0)
    rows = rng.random(400) < 0.7
    every = subset_estimate({"t": rows.astype(float).tolist()}, {"t": 400}, {"t": 1.0})
    assert every.full and every.stderr == 0 and every.fitness == pytest.approx(rows.mean())
    inside = 0
    for _ in range(400):  # 40 rows without replacement: within 2 stderrs about 95% of the time
        pick = rng.choice(400, 40, replace=False)
        est = subset_estimate({"t": rows[pick].astype(float).tolist()}, {"t": 400}, {"t": 1.0})
        inside += abs(est.fitness - rows.mean()) <= 2 * est.stderr
    assert 0.92 <= inside / 400 <= 0.99
    # All right on a few rows is not certainty.
    assert subset_estimate({"t": [1.0] * 5}, {"t": 400}, {"t": 1.0}).stderr > 0.05
    # Tasks combine by weight.
    two = subset_estimate({"a": [1.0, 1.0], "b": [0.0, 1.0]}, {"a": 4, "b": 4}, {"a": 3, "b": 1})
    assert two.fitness == pytest.approx((3 * 1.0 + 1 * 0.5) / 4) and two.rows == 4


def test_modes_parse_with_one_line_errors():
    base = {"tasks": [{"task": "t", "metric": "acc", "heldout": None}]}
    assert parse_fitness_spec({**base, "mode": "racing"}).mode.chunk == 50
    assert parse_fitness_spec({**base, "mode": {"type": "irt", "anchors": 12}}).mode.anchors == 12
    assert parse_fitness_spec(base).mode.type == "full"
    for mode, fragment in [
        ("minibatch", "mode.minibatch.rows: Field required"),
        ({"type": "racing", "chunk": 0}, "mode.racing.chunk"),
        ("cheap", "mode: Input tag 'cheap'"),
        ({"type": "irt", "anchor": 3}, "anchor"),
    ]:
        with pytest.raises(EvalError, match=fragment) as info:
            parse_fitness_spec({**base, "mode": mode})
        assert "\n" not in str(info.value)
    with pytest.raises(SearchError, match=r"racing .* executor: serial"):
        check_mode(RacingMode(type="racing"), "ray")
    with pytest.raises(SearchError, match="pruner: 'Median' is not an Optuna pruner"):
        check_mode(RacingMode(type="racing", pruner="Median"), "serial")


class _Journal:
    def __init__(self):
        self.attrs = {}

    def get_attr(self, key, default=None):
        return self.attrs.get(key, default)

    def set_attr(self, key, value):
        self.attrs[key] = value


def race(population: np.ndarray, *, z: float, chunk: int, seed: int = 0):
    """Racing over one generation of recorded per-row values (candidates x rows), candidates
    in order; returns each one's outcome."""
    policy = RacingPolicy.__new__(RacingPolicy)
    rows = FitnessRows({"t": list(range(population.shape[1]))}, {"t": 1.0})
    policy.rows, policy.journal, policy.seed = rows, _Journal(), seed
    policy.rescore_count, policy.extra_rows = 0, 0
    policy.mode, policy.optuna = RacingMode(type="racing", z=z, chunk=chunk), False
    policy.parents = len(population) // 2
    policy.chunks = rows.chunks(chunk, np.random.default_rng([seed, 7]))
    policy.bounds, policy.interrupted = {}, {}
    outcomes = []
    for number, values in enumerate(population):
        proposal = Proposal(number, 0, [float(number)])
        ticket = policy.ticket(proposal)

        def score(request, values=values):
            ids = sorted(request["t"])
            return EvalResult("fitness", [], rows={"t": [float(values[i]) for i in ids]})

        outcome = ticket.run(score)
        policy.finished(proposal, outcome)
        outcomes.append(outcome)
    return outcomes


def test_racing_never_stops_a_candidate_that_would_have_been_a_parent():
    """Populations of 8 whose full-set scores are spread like an early CMA-ES generation: a
    stopped candidate must rank below the generation's parents by its full-set score, except at
    the stated rate (each of k looks errs with probability at most Phi(-z))."""
    rng = np.random.default_rng(1)
    z, chunk, n_rows = 2.5, 50, 300
    looks = n_rows // chunk - 1
    wrong = stopped = total = 0
    for _ in range(60):
        accuracy = rng.uniform(0.4, 0.95, size=8)
        population = rng.random((8, n_rows)) < accuracy[:, None]
        full = population.mean(axis=1)
        outcomes = race(population.astype(float), z=z, chunk=chunk)
        parents = set(np.argsort(-full, kind="stable")[:4].tolist())
        for k, outcome in enumerate(outcomes):
            total += 1
            if outcome.stopped:
                stopped += 1
                wrong += k in parents
            else:
                assert outcome.full and outcome.fitness == pytest.approx(full[k])
    assert stopped > total * 0.1  # racing does stop hopeless candidates (at most half can)
    assert wrong <= max(1, math.ceil(total * looks * 0.5 * math.erfc(z / math.sqrt(2))))
    # Fewer rows than a full generation, and every stopped candidate saw at least one chunk.
    rows = [o.rows for o in race(population.astype(float), z=z, chunk=chunk)]
    assert min(rows) >= chunk and sum(rows) <= 8 * n_rows


def test_a_resumed_race_continues_from_its_saved_chunks():
    rng = np.random.default_rng(2)
    values = (rng.random(300) < 0.8).astype(float)
    policy_rows = FitnessRows({"t": list(range(300))}, {"t": 1.0})
    chunks = policy_rows.chunks(50, np.random.default_rng(0))
    calls = []

    def score(request):
        calls.append(len(request["t"]))
        return EvalResult("fitness", [], rows={"t": [values[i] for i in sorted(request["t"])]})

    from evomerge.search.fitness import RaceTicket

    saved = []
    first = RaceTicket(policy_rows, chunks, lambda e, k: False, lambda c: saved.append(list(c)))
    whole = first.run(score)
    assert len(calls) == 6 and whole.full
    calls.clear()
    again = RaceTicket(policy_rows, chunks, lambda e, k: False, lambda c: None, saved[2])
    assert again.run(score).fitness == whole.fitness
    assert len(calls) == 3  # chunks 4, 5 and 6 only


def two_skill_population(rng, n_models: int, n_rows: int = 300) -> np.ndarray:
    """Per-row correctness of models like a search's candidates (abilities spread around one
    point) on two skills: half the rows need skill 1, half skill 2."""
    skills = rng.normal([1.5, 1.5], 0.3, size=(n_models, 2))
    need = np.zeros((n_rows, 2))
    need[: n_rows // 2, 0] = rng.uniform(0.8, 2.0, n_rows // 2)
    need[n_rows // 2 :, 1] = rng.uniform(0.8, 2.0, n_rows - n_rows // 2)
    difficulty = rng.normal(0.0, 1.5, n_rows)
    p = 1 / (1 + np.exp(-(skills @ need.T + difficulty)))
    return (rng.random(p.shape) < p).astype(float)


def test_irt_estimates_lie_within_their_error_bars_at_the_stated_rate():
    """Calibrated on 11 models, estimated from 30 anchors for 40 models it never saw: the
    full-set score lies within 2 stated stderrs for at least 90% of them (about 95% stated),
    and the estimate beats the mean of 30 random rows."""
    rng = np.random.default_rng(4)
    models = two_skill_population(rng, 51)
    tasks, ids = ["t"] * 300, list(range(300))
    calibration = irt.calibrate(models[:11], tasks, ids, {"t": 1.0}, anchors=30, dims=2)
    assert len(calibration.anchors) == 30 == len(set(calibration.anchors))
    inside, errors, random_errors = 0, [], []
    for y in models[11:]:
        anchors = calibration.anchors
        est = irt.predict(
            calibration.model, anchors, y[anchors].tolist(), {"t": 1.0}, calibration.misfit
        )
        inside += abs(est.fitness - y.mean()) <= 2 * est.stderr
        errors.append(abs(est.fitness - y.mean()))
        random_errors.append(abs(y[rng.choice(300, 30, replace=False)].mean() - y.mean()))
    assert inside / 40 >= 0.9
    assert np.mean(errors) < np.mean(random_errors)
    # A calibration survives the journal's JSON.
    again = irt.Calibration.from_dict(calibration.to_dict())
    y = models[20]
    assert irt.predict(again.model, again.anchors, y[again.anchors].tolist(), {"t": 1.0}) == (
        irt.predict(
            calibration.model, calibration.anchors, y[calibration.anchors].tolist(), {"t": 1.0}
        )
    )


def test_rows_spread_over_tasks():
    rows = FitnessRows({"a": list(range(100)), "b": list(range(100, 130))}, {"a": 1, "b": 1})
    pick = rows.sample(13, np.random.default_rng(0))
    assert len(pick["a"]) == 10 and len(pick["b"]) == 3
    chunks = rows.chunks(20, np.random.default_rng(0))
    assert all(c["a"] and c["b"] for c in chunks)
    assert sorted(i for c in chunks for i in c["a"] + c["b"]) == list(range(130))
