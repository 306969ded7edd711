"""What scoring one candidate costs: `python benchmarks/eval_speed.py [--candidates 8]`.

Takes the shipped demo family (demo/family), merges its experts in memory with TIES, and scores a
series of candidates (new TIES weights each) on the demo fitness spec, the way a search does.
Reports the seconds per candidate evaluation and the share of it spent outside the model's
forward passes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _recipe(family: Path, weights: tuple[float, float]):
    from evomerge.merge.recipe import parse_recipe

    return parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(family / "base"),
            "models": [
                {"model": str(family / name), "parameters": {"weight": w, "density": 0.8}}
                for name, w in zip(("expert_a", "expert_b"), weights, strict=True)
            ],
            "dtype": "float32",
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, help="demo family folder (default: demo/family)")
    parser.add_argument("--spec", type=Path, help="fitness spec (default: the demo spec)")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, help="override the spec's batch size")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from evomerge.evals.evaluator import Evaluator
    from evomerge.evals.spec import FitnessSpec, load_fitness_spec
    from evomerge.evals.suite import prepare_suites
    from evomerge.merge.resident import ResidentMerger

    family = args.family or REPO / "demo" / "family"
    spec = load_fitness_spec(args.spec or REPO / "evals" / "specs" / "demo.yaml")
    if args.batch_size:
        spec = FitnessSpec.model_validate({**dict(spec), "batch_size": args.batch_size})

    started = time.perf_counter()
    suites = prepare_suites(spec)
    prepared = time.perf_counter() - started
    merger = ResidentMerger(_recipe(family, (0.5, 0.5)), device="cpu")
    model = merger.build_model()
    evaluator = Evaluator(model, merger.tokenizer(), suites)
    cold = evaluator.score("fitness")  # builds requests and tokenizes: once per search

    rng = random.Random(0)
    runs, merges = [], []
    for _ in range(args.candidates):
        weights = (rng.uniform(0.1, 1.0), rng.uniform(0.1, 1.0))
        t0 = time.perf_counter()
        merger.materialize(model, _recipe(family, weights))
        merges.append(time.perf_counter() - t0)
        runs.append(evaluator.score("fitness"))

    docs = sum(s.n for s in cold.scores)
    seconds = statistics.mean(r.seconds for r in runs)
    outside = statistics.mean(r.outside_forward_share for r in runs)
    print(f"torch threads {args.threads}, batch size {evaluator.batch_size}, {docs} documents")
    print(f"tasks prepared once:             {prepared:6.2f} s")
    print(f"first evaluation (builds cache): {cold.seconds:6.2f} s")
    print(f"evaluation per candidate:        {seconds:6.2f} s  (mean of {len(runs)})")
    print(f"  outside forward passes:        {100 * outside:6.1f} %")
    print(f"materialize per candidate:       {statistics.mean(merges):6.3f} s")
    print(
        f"fitness range: {min(r.fitness for r in runs):.3f} .. {max(r.fitness for r in runs):.3f}"
    )


if __name__ == "__main__":
    main()
