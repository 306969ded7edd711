"""Search strategies against each other at the same evaluation budget: CMA-ES, random search,
Optuna TPE and the two breeding strategies (natural_niches, cycle_qd), several seeds, on the
demo family or the composition family.

Every strategy searches the family's recipe (recipes/demo.yaml, recipes/smol-compose.yaml) with
a fitness of two or more tasks (cycle_qd keeps one archive per task), the same for all of them:

- demo: addition and Roman numerals, 150 fitness rows each: the rows of demo.yaml's demo_mixed
  (which interleaves the two), judged on their 300 + 300 held-out rows;
- compose: recipes/smol-compose.yaml's fitness: the composed task (arith_french, 50 rows) with
  the two skills (arith_digits and french_words, 25 rows each) at a tenth of its weight each,
  judged on the composed task's 300 held-out rows (100 of each skill's beside it).

For each strategy and seed: the best trial by fitness after half the budget and after all of it,
each scored on the held-out split, and the evaluations it took for the best fitness so far to
pass the start recipe's (every gene at its init: the naive merge on the demo, mergekit's hand
task arithmetic with weight 1 on the compose family). Runs resume (each in its own study under
--workdir), so an interrupted benchmark picks up where it stopped. Prints one table.

    python benchmarks/search_vs_baselines.py --family demo --seeds 0 1 2
    python benchmarks/search_vs_baselines.py --family compose --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from evomerge.search.config import OptimizerSpec, load_search_recipe
from evomerge.search.loop import Search

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "CMA-ES": {"name": "CMA"},
    "random search": {"backend": "optuna", "name": "RandomSampler"},
    "Optuna TPE": {"backend": "optuna", "name": "TPESampler"},
    "natural_niches": {"name": "natural_niches"},
    "cycle_qd": {"name": "cycle_qd"},
}


def _entry(task: str, rows: str, heldout: str | dict, weight: float = 1.0) -> dict:
    return {"task": task, "metric": None, "rows": rows, "heldout": heldout, "weight": weight}


FAMILIES = {
    "demo": {
        "recipe": REPO / "recipes" / "demo.yaml",
        "metric": "exact_match",
        "tasks": [
            _entry("demo_skill_a", "0:150", "demo_skill_a_heldout"),
            _entry("demo_skill_b", "0:150", "demo_skill_b_heldout"),
        ],
        "judged": None,  # the held-out total
    },
    "compose": {
        "recipe": REPO / "recipes" / "smol-compose.yaml",
        "metric": "acc",
        "tasks": [
            _entry("arith_french", "0:50", {"task": "arith_french", "rows": "200:500"}),
            _entry("arith_digits", "0:25", {"task": "arith_digits", "rows": "200:300"}, 0.1),
            _entry("french_words", "0:25", {"task": "french_words", "rows": "200:300"}, 0.1),
        ],
        "judged": "arith_french",
    },
}


def bench_recipe(family: dict, strategy: dict, seed: int, budget: int | None):
    base = load_search_recipe(family["recipe"])
    tasks = [{**t, "metric": family["metric"]} for t in family["tasks"]]
    fitness = base.fitness.model_dump(mode="json", exclude_none=True) | {"tasks": tasks}
    optimizer = OptimizerSpec(population=base.optimizer.population, **strategy)
    data = base.model_dump(mode="json", exclude_none=True) | {
        "fitness": fitness,
        "optimizer": optimizer.model_dump(mode="json"),
        "seed": seed,
        "baselines": [],
    }
    if budget:
        data["budget"] = {"evaluations": budget}
    return type(base).model_validate(data)


def judged(result, task: str | None) -> tuple[float, float]:
    if task is None:
        return result.fitness, result.fitness_stderr
    score = next(s for s in result.scores if s.task == task)
    return score.value, score.stderr


def run_seed(family: dict, seed: int, args, rows: dict) -> None:
    from evomerge.evals.suite import prepare_suites

    executor = suites = start = None
    for label in args.strategies:
        recipe = bench_recipe(family, STRATEGIES[label], seed, args.budget)
        out = args.workdir / args.family / f"{STRATEGIES[label]['name']}-{seed}"
        out.mkdir(parents=True, exist_ok=True)
        search = Search.prepare(recipe, out)
        if executor is None:
            suites = prepare_suites(recipe.fitness)
            executor = search.space.make_executor(recipe, suites)
            start = executor.score(search.space.candidate(search.space.init()), "fitness").fitness
        started = time.perf_counter()
        journal, _ = search.evolve(suites, executor, resume=True, progress=False,
                                   echo=lambda _: None)  # fmt: skip
        seconds = time.perf_counter() - started
        trials = journal.finished()
        budget = len(trials)
        cells = {}
        for k in (budget // 2, budget):
            done = [t for t in trials[:k] if not t.outcome.failed]
            best = max(done, key=lambda t: (t.outcome.fitness, -t.number))
            held = executor.score(search.space.candidate(best.genome), "heldout")
            cells[k] = judged(held, family["judged"])
        so_far, passed = -math.inf, None
        for i, t in enumerate(trials, 1):
            if not t.outcome.failed:
                so_far = max(so_far, t.outcome.fitness)
            if passed is None and so_far > start:
                passed = i
        run = {"seed": seed, "half": cells[budget // 2], "full": cells[budget], "passed": passed,
               "evaluations": budget, "seconds": seconds}  # fmt: skip
        rows.setdefault(label, []).append(run)
        print(json.dumps({"strategy": label, **rows[label][-1]}), flush=True)
    if executor is not None:
        executor.close()


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, help="evaluations (default: the recipe's)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES),
                        default=list(STRATEGIES))  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/search-bench"))
    args = parser.parse_args()
    family = FAMILIES[args.family]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        run_seed(family, seed, args, rows)
    what = family["judged"] or "held-out total"
    print(f"\n{args.family}: best trial by fitness, scored on held-out {what} (mean over seeds "
          f"{', '.join(map(str, args.seeds))} ± half their range; per seed: value ± stderr)")
    print("| strategy | after half the budget | after the budget | per seed, full budget | "
          "evaluations to pass the start recipe |")
    print("| --- | --- | --- | --- | --- |")
    for label, runs in rows.items():
        half = _mean_spread([r["half"][0] for r in runs])
        full = _mean_spread([r["full"][0] for r in runs])
        seeds = "; ".join(f"{r['full'][0]:.3f} ± {r['full'][1]:.3f}" for r in runs)
        passed = ", ".join("never" if r["passed"] is None else str(r["passed"]) for r in runs)
        print(f"| {label} | {half} | {full} | {seeds} | {passed} |")
    print("\nbudget per run:", ", ".join(f"{r['evaluations']}" for r in next(iter(rows.values()))),
          "evaluations; wall s per run:", ", ".join(
              f"{label} {statistics.fmean(r['seconds'] for r in runs):.0f}"
              for label, runs in rows.items()))  # fmt: skip


if __name__ == "__main__":
    main()
