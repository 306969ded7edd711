"""What each fitness mode costs and finds: the demo search (recipes/demo.yaml) with every mode
at the same seed and evaluation budget, against `full`.

    python benchmarks/fitness_cost.py                    # every mode, 150 evaluations
    python benchmarks/fitness_cost.py --modes full irt --evaluations 80

Prints fitness rows scored (trials and re-scoring together), their share of a full
search, wall time, and the best candidate's held-out score with its stderr; a mode "holds" when
its best held-out score is within the combined stderr of full's; s/candidate is the mean time
to materialize and score one candidate. Then the estimator's error:
for up to 50 trials each cheap mode scored on fewer rows, its estimate against the same
candidate scored on every fitness row (mean absolute error, mean stated stderr, and how often
the full-set score lies within 2 stated stderrs). Runs on CPU, one thread, like the demo.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "full": "full",
    "racing": {"type": "racing"},
    "racing-z1.5": {"type": "racing", "z": 1.5, "chunk": 30},
    "minibatch": {"type": "minibatch", "rows": 24},
    "irt": {"type": "irt", "anchors": 30},
}
ESTIMATED = 50


def run(mode: object, evaluations: int, out: Path) -> tuple[dict, object, list]:
    import json

    from evomerge.search.config import parse_search_recipe
    from evomerge.search.loop import Search

    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    data["fitness"]["mode"] = mode
    data["budget"] = {"evaluations": evaluations}
    recipe = parse_search_recipe(data, "recipes/demo.yaml", REPO)
    search = Search.prepare(recipe, out)
    summary = search.run(echo=lambda _: None, progress=False, write_model=False)
    return json.loads((out / "summary.json").read_text()), search, summary.trials


def estimator_error(search, trials) -> tuple[int, float, float, float] | None:
    """(candidates, mean |estimate - full|, mean stated stderr, share within 2 stderrs)."""
    from evomerge.evals.suite import prepare_suites

    estimated = [t for t in trials if not t.outcome.failed and not t.outcome.full][:ESTIMATED]
    if not estimated:
        return None
    executor = search.space.make_executor(search.recipe, prepare_suites(search.recipe.fitness))
    errors, stderrs = [], []
    try:
        for trial in estimated:
            full = executor.score(search.space.candidate(trial.genome), "fitness").fitness
            errors.append(trial.outcome.fitness - full)
            stderrs.append(trial.outcome.fitness_stderr or 0.0)
    finally:
        executor.close()
    errors, stderrs = np.abs(errors), np.array(stderrs)
    return (
        len(errors),
        float(errors.mean()),
        float(stderrs.mean()),
        float((errors <= 2 * stderrs).mean()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--evaluations", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, errors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.modes:
            summary, search, trials = run(MODES[name], args.evaluations, Path(tmp) / name)
            per = [
                sum(t.outcome.seconds.get(k, 0.0) for k in ("materialize", "evaluate"))
                for t in trials
            ]
            summary["per_candidate"] = sum(per) / len(per)
            rows.append((name, summary))
            if name != "full":
                errors.append((name, estimator_error(search, trials)))
    full = dict(rows).get("full")
    print(f"demo search, seed 0, {args.evaluations} evaluations, CPU, 1 thread\n")
    header = (
        "mode",
        "s/candidate",
        "rows scored",
        "share",
        "fewer",
        "stopped",
        "wall s",
        "best fitness",
        "held-out ± stderr",
        "holds",
    )
    table = [header]
    for name, s in rows:
        best = s["best"]
        holds = "-"
        if full is not None and name != "full":
            margin = math.hypot(best["heldout_stderr"], full["best"]["heldout_stderr"])
            holds = "yes" if best["heldout"] >= full["best"]["heldout"] - margin else "no"
        table.append(
            (
                name,
                f"{s['per_candidate']:.3f}",
                str(s["rows_scored"]),
                f"{s['rows_share']:.1%}",
                f"{1 / s['rows_share']:.1f}x",
                str(s["stopped"]),
                f"{s['wall_seconds']:.1f}",
                f"{best['fitness']:.4f}",
                f"{best['heldout']:.4f} ± {best['heldout_stderr']:.4f}",
                holds,
            )
        )
    print_table(table)
    if errors:
        print("\nestimator error (estimate against the full-set score of the same candidate)\n")
        table = [("mode", "candidates", "mean |error|", "mean stderr", "within 2 stderr")]
        for name, err in errors:
            if err is None:
                table.append((name, "0", "-", "-", "-"))
            else:
                n, mae, se, share = err
                table.append((name, str(n), f"{mae:.4f}", f"{se:.4f}", f"{share:.0%}"))
        print_table(table)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
