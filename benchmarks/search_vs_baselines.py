"""CMA-ES against random search and the best single global weight on the demo family.

Runs recipes/demo.yaml's search with Nevergrad CMA and with RandomSearch (same budget, same
seed), takes each one's best-so-far candidate after 25, 50 and 100 evaluations, and scores it
on the held-out split. The global-weight baseline tries one weight for every model and layer
(density as in the recipe's init) on a grid, picks the best on the fitness split and scores it
held out. Prints a side-by-side table and the per-candidate time split.

    python benchmarks/search_vs_baselines.py --workdir /tmp/search-bench
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evomerge.search.config import load_search_recipe
from evomerge.search.executor import SerialExecutor
from evomerge.search.loop import Search

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = (25, 50, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    parser.add_argument("--grid", type=int, default=11, help="global weights tried")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = load_search_recipe(args.recipe)
    budget = base.budget.model_copy(update={"evaluations": max(CHECKPOINTS)})
    rows: dict[str, list[str]] = {}
    timing: dict[str, dict[str, float]] = {}
    executor = None
    for label, name in (("CMA-ES", "CMA"), ("random search", "RandomSearch")):
        optimizer = base.optimizer.model_copy(update={"name": name})
        recipe = base.model_copy(update={"budget": budget, "optimizer": optimizer})
        search = Search.prepare(recipe, args.workdir / name)
        started = time.perf_counter()
        summary = search.run(resume=True, echo=lambda _: None, progress=False, write_model=False)
        timing[label] = {"wall s": time.perf_counter() - started, **_split(summary.trials)}
        if executor is None:
            executor = SerialExecutor(
                search.space.to_recipe(search.space.init()),
                summary_suites(recipe),
                device=recipe.device,
                seed=recipe.seed,
            )
        cells = []
        for k in CHECKPOINTS:
            done = [t for t in summary.trials[:k] if not t.outcome.failed]
            best = max(done, key=lambda t: (t.outcome.fitness, -t.number))
            held = executor.score(search.space.to_recipe(best.genome), "heldout")
            cells.append(_cell(best.outcome.fitness, held))
        rows[label] = cells
    assert executor is not None
    space = Search.prepare(base, args.workdir / "grid").space
    best_w, best_fit = None, -1.0
    for i in range(args.grid):
        w = i / (args.grid - 1)
        genome = [w if g.param == "weight" else g.init for g in space.genes]
        fit = executor.score(space.to_recipe(genome), "fitness").fitness
        if fit > best_fit:
            best_w, best_fit = genome, fit
    held = executor.score(space.to_recipe(best_w), "heldout")
    weight = best_w[[g.param for g in space.genes].index("weight")]
    rows[f"global weight {weight:.1f} ({args.grid} evals)"] = [_cell(best_fit, held)] * len(
        CHECKPOINTS
    )
    print(f"fitness / held-out ({args.recipe.name}; held-out ± stderr)")
    print(f"{'':32}" + "".join(f"{f'after {k} evals':>26}" for k in CHECKPOINTS))
    for label, cells in rows.items():
        print(f"{label:32}" + "".join(f"{c:>26}" for c in cells))
    print("\nseconds per candidate (mean over completed trials)")
    for label, split in timing.items():
        print(f"{label:16}" + "  ".join(f"{k} {v:.3f}" for k, v in split.items()))


def _cell(fitness: float, held) -> str:
    return f"{fitness:.3f} / {held.fitness:.3f} ± {held.fitness_stderr:.3f}"


def summary_suites(recipe):
    from evomerge.evals.suite import prepare_suites

    return prepare_suites(recipe.fitness)


def _split(trials) -> dict[str, float]:
    done = [t for t in trials if not t.outcome.failed]
    keys = ("materialize", "evaluate", "optimizer")
    return {k: sum(t.outcome.seconds.get(k, 0.0) for t in done) / len(done) for k in keys}


if __name__ == "__main__":
    main()
