"""Wall time of the same search with the serial executor and with 1 and 2 Ray workers.

    python benchmarks/ray_speedup.py --evaluations 64 --workdir /tmp/ray-bench

Uses recipes/demo.yaml (the demo family on CPU). Every run makes the same trials; only the
wall time differs. On a GPU machine pass --device cuda: one worker per GPU.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from evomerge.search.config import load_search_recipe
from evomerge.search.loop import Search

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    parser.add_argument("--evaluations", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ray-bench"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    base = load_search_recipe(args.recipe)
    budget = base.budget.model_copy(update={"evaluations": args.evaluations, "seconds": None})
    rows = []
    for label, update in (
        ("serial", {"executor": "serial"}),
        ("ray, 1 worker", {"executor": "ray", "workers": 1}),
        ("ray, 2 workers", {"executor": "ray", "workers": 2}),
    ):
        recipe = base.model_copy(update={"budget": budget, "device": args.device, **update})
        out = args.workdir / label.replace(", ", "-").replace(" ", "")
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        summary = Search.prepare(recipe, out).run(
            echo=lambda _: None, progress=False, write_model=False
        )
        seconds = time.perf_counter() - started
        rows.append((label, seconds, summary.best.outcome.fitness))
    serial = rows[0][1]
    print(f"{args.evaluations} evaluations of {args.recipe.name} on {args.device} "
          "(wall time including start-up and the final scoring of references)")
    for label, seconds, best in rows:
        print(f"{label:16} {seconds:7.1f} s  {serial / seconds:4.2f}x of serial  best {best:.4f}")


if __name__ == "__main__":
    main()
