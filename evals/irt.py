"""Item response theory for fitness rows (as tinyBenchmarks, Polo et al. 2024, and MERGE3,
Mencattini et al. 2025): a candidate's full-set score from a few anchor rows, with an error bar.

A multidimensional two-parameter logistic model: model i answers row j right with probability
sigmoid(theta_i . a_j + b_j). It is fitted (MAP, standard normal priors on abilities and
difficulties, N(0, 1) on discriminations) to the per-row correctness of calibration models;
`choose_anchors` clusters the rows' fitted (a, b) within each task and takes the row nearest
each cluster's centre. A new candidate scored on the anchors gets its ability by MAP with the
rows fixed, and its full-set score is its anchor answers plus the predicted probabilities of the
other rows. The error bar adds three variances: the ability's (Laplace, through the delta
method), the unscored rows' own Bernoulli noise, and the model's misfit measured by leaving
each calibration model out. No maintained IRT library fits here (py-irt needs Pyro and fits
binary responses only); the model is small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.evals.estimate import Estimate, combine

STEPS = 300
B_SCALE = 3.0  # prior scale of the difficulties: many rows are easy for every model
PRIOR_FLOOR = 0.2  # added to the calibration abilities' covariance: candidates stray further


@dataclass(frozen=True)
class ItemModel:
    """Fitted rows: `a` (rows x dims), `b` (rows); `tasks[j]` is row j's task, `ids[j]` its
    document index in that task. A new model's ability has the prior N(`mean`, `cov`): the
    spread of the calibration models' abilities."""

    a: np.ndarray
    b: np.ndarray
    tasks: list[str]
    ids: list[int]
    mean: np.ndarray
    cov: np.ndarray

    def to_dict(self) -> dict:
        fields = ("a", "b", "mean", "cov")
        return {
            **{k: getattr(self, k).tolist() for k in fields},
            "tasks": self.tasks,
            "ids": self.ids,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ItemModel:
        arrays = {k: np.array(data[k]) for k in ("a", "b", "mean", "cov")}
        return cls(tasks=list(data["tasks"]), ids=list(data["ids"]), **arrays)


@dataclass(frozen=True)
class Calibration:
    """What the search keeps: the fitted rows, the anchors (positions in `model`), and each
    task's misfit variance."""

    model: ItemModel
    anchors: list[int]
    misfit: dict[str, float]

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "anchors": self.anchors, "misfit": self.misfit}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(ItemModel.from_dict(data["model"]), list(data["anchors"]), dict(data["misfit"]))


def calibrate(
    responses: np.ndarray,
    tasks: list[str],
    ids: list[int],
    weights: Mapping[str, float],
    *,
    anchors: int,
    dims: int,
    seed: int = 0,
) -> Calibration:
    """Fit, choose anchors, and measure the misfit: each calibration model left out in turn
    is estimated from its anchors by a model fitted without it; the misfit of a task is the
    mean squared error beyond the stated variance."""

    def fitted(rows: np.ndarray) -> tuple[ItemModel, list[int]]:
        a, b, theta = fit(rows, dims, seed=seed)
        spread = np.cov(theta, rowvar=False).reshape(dims, dims) if len(theta) > 1 else 0.0
        model = ItemModel(a, b, tasks, ids, theta.mean(axis=0), spread + PRIOR_FLOOR * np.eye(dims))
        return model, choose_anchors(a, b, tasks, anchors, seed=seed)

    model, chosen = fitted(responses)
    excess: dict[str, list[float]] = {t: [] for t in dict.fromkeys(tasks)}
    if len(responses) >= 3:
        for i in range(len(responses)):
            others, held = np.delete(responses, i, axis=0), responses[i]
            loo, loo_anchors = fitted(others)
            guess = predict(loo, loo_anchors, held[loo_anchors].tolist(), weights)
            for task in excess:
                truth = float(held[[j for j, t in enumerate(tasks) if t == task]].mean())
                error = (guess.scores[task] - truth) ** 2 - guess.stderrs[task] ** 2
                excess[task].append(max(0.0, error))
    misfit = {t: float(np.mean(v)) if v else 0.0 for t, v in excess.items()}
    return Calibration(model, chosen, misfit)


def fit(responses: np.ndarray, dims: int, *, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Row parameters (a, b) and abilities fitted to `responses` (models x rows, in [0, 1])."""
    y = torch.as_tensor(responses, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    theta = 0.1 * torch.randn(y.shape[0], dims, generator=gen, dtype=torch.float64)
    a = 0.1 * torch.randn(y.shape[1], dims, generator=gen, dtype=torch.float64) + 0.5
    b = torch.zeros(y.shape[1], dtype=torch.float64)
    params = [theta.requires_grad_(), a.requires_grad_(), b.requires_grad_()]
    opt = torch.optim.LBFGS(params, max_iter=STEPS, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        logits = theta @ a.T + b
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        prior = theta.square().sum() + a.square().sum() + (b / B_SCALE).square().sum()
        value = nll + 0.5 * prior
        value.backward()
        return value

    opt.step(loss)
    return a.detach().numpy(), b.detach().numpy(), theta.detach().numpy()


def ability(model: ItemModel, rows: Sequence[int], answers: Sequence[float]) -> tuple:
    """MAP ability from `answers` to rows `rows` (positions in `model`), and its covariance
    (the inverse Hessian of the negative log posterior)."""
    a, b = model.a[list(rows)], model.b[list(rows)]
    y = np.asarray(answers, dtype=float)
    precision = np.linalg.inv(model.cov)
    theta = model.mean.copy()
    for _ in range(100):  # Newton; the posterior is log-concave
        p = _sigmoid(a @ theta + b)
        grad = a.T @ (y - p) - precision @ (theta - model.mean)
        hess = (a * (p * (1 - p))[:, None]).T @ a + precision
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        if np.abs(step).max() < 1e-10:
            break
    p = _sigmoid(a @ theta + b)
    hess = (a * (p * (1 - p))[:, None]).T @ a + precision
    return theta, np.linalg.inv(hess)


def predict(
    model: ItemModel,
    anchors: Sequence[int],
    answers: Sequence[float],
    weights: Mapping[str, float],
    misfit: Mapping[str, float] | None = None,
) -> Estimate:
    """A candidate's full-set fitness from its answers to the anchor rows."""
    theta, cov = ability(model, anchors, answers)
    p = _sigmoid(model.a @ theta + model.b)
    seen = dict(zip(anchors, answers, strict=True))
    scores, stderrs = {}, {}
    for task in dict.fromkeys(model.tasks):
        members = [j for j, t in enumerate(model.tasks) if t == task]
        n = len(members)
        rest = [j for j in members if j not in seen]
        total = sum(seen[j] for j in members if j in seen) + p[rest].sum()
        slope = ((p[rest] * (1 - p[rest]))[:, None] * model.a[rest]).sum(axis=0)
        variance = float(slope @ cov @ slope + (p[rest] * (1 - p[rest])).sum()) / n**2
        variance += (misfit or {}).get(task, 0.0)
        scores[task], stderrs[task] = float(total / n), math.sqrt(variance)
    return combine(scores, stderrs, weights, rows=len(anchors), full=False)


def choose_anchors(
    a: np.ndarray, b: np.ndarray, tasks: Sequence[str], count: int, *, seed: int = 0
) -> list[int]:
    """`count` rows (positions), spread over the tasks by their row counts (at least one
    each): per task, the row nearest each k-means centre of the rows' (a, b)."""
    rng = np.random.default_rng(seed)
    names = list(dict.fromkeys(tasks))
    members = {t: [j for j, name in enumerate(tasks) if name == t] for t in names}
    quota = allocate(count, {t: len(m) for t, m in members.items()})
    chosen: list[int] = []
    for task in names:
        rows = np.array(members[task])
        points = np.column_stack([a[rows], b[rows]])
        points = (points - points.mean(axis=0)) / (points.std(axis=0) + 1e-9)
        centres = _kmeans(points, quota[task], rng)
        taken: set[int] = set()
        for centre in centres:
            order = np.argsort(((points - centre) ** 2).sum(axis=1), kind="stable")
            pick = next(int(k) for k in order if int(k) not in taken)
            taken.add(pick)
        chosen += sorted(int(rows[k]) for k in taken)
    return chosen


def allocate(count: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """`count` split over groups in proportion to `sizes` (largest remainders), at least one
    per group and at most its size."""
    total = sum(sizes.values())
    count = max(count, len(sizes))
    raw = {k: count * s / total for k, s in sizes.items()}
    quota = {k: max(1, min(sizes[k], int(v))) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - int(raw[k]), reverse=True):
        if sum(quota.values()) >= min(count, total):
            break
        if quota[k] < sizes[k]:
            quota[k] += 1
    return quota


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding, then Lloyd's iterations."""
    k = min(k, len(points))
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        dist = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        if dist.sum() <= 0:
            centres.append(points[rng.integers(len(points))])
        else:
            centres.append(points[rng.choice(len(points), p=dist / dist.sum())])
    centres = np.array(centres)
    for _ in range(100):
        labels = np.argmin(((points[:, None] - centres[None]) ** 2).sum(axis=2), axis=1)
        moved = np.array(
            [
                points[labels == i].mean(axis=0) if (labels == i).any() else centres[i]
                for i in range(k)
            ]
        )
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))
