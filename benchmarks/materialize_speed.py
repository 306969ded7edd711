"""Per-candidate in-memory merge time against one copy pass, per method, on the real family
(SmolLM2-135M-Instruct and two experts, bf16: tests/real_family.py, built once into the cache).

A candidate is `ResidentMerger.materialize(model)`: the merge math of every tensor written into
the preallocated model. The floor is one `copy_` pass over the same parameters (the bytes a
merge must at least write). Medians of `--repeats` calls after a warm-up (of at least 11 for the
copy pass, which is short and noisy), at each thread count.

    python benchmarks/materialize_speed.py --threads 1 2 [--device cuda] [--repeats 5]

Measure on a quiet machine: a second busy process makes multi-thread CPU numbers meaningless.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_family import real_family  # the test family's builder

from evomerge.merge.recipe import parse_recipe
from evomerge.merge.resident import ResidentMerger

METHODS = {  # name: (merge_method, per-model parameters, recipe-wide parameters)
    "linear": ("linear", {"weight": 0.5}, {}),
    "task_arithmetic": ("task_arithmetic", {"weight": 0.5}, {}),
    "ties, selection: fast": ("ties", {"weight": 0.5, "density": 0.5}, {"selection": "fast"}),
    "ties (exact)": ("ties", {"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": ("dare_ties", {"weight": 0.5, "density": 0.5}, {}),
    "della": ("della", {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
}


def recipe(method: str, family) -> object:
    name, params, shared = METHODS[method]
    models = [{"model": str(e), "parameters": dict(params)} for e in family.experts]
    data = {"merge_method": name, "models": models, "dtype": "bfloat16", **shared}
    if name != "linear":
        data["base_model"] = str(family.base)
    return parse_recipe(data)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    family = real_family()
    device = torch.device(args.device)
    rows = []
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for method in args.methods:
            merger = ResidentMerger(recipe(method, family), device=args.device, seed=0)
            model = merger.build_model()
            params = [p.data for p in model.parameters()]
            sources = [p.clone() for p in params]

            def copy_pass(params=params, sources=sources) -> None:
                for dst, src in zip(params, sources, strict=True):
                    dst.copy_(src)

            with torch.no_grad():
                merge = median_seconds(lambda m=merger, x=model: m.materialize(x), device,
                                       args.repeats)  # fmt: skip
                copy = median_seconds(copy_pass, device, max(args.repeats, 11))  # it is short
            rows.append((threads, method, merge, copy))
            del merger, model, params, sources
    where = args.device if device.type != "cpu" else "CPU"
    print(f"| {where} threads | method | per candidate | copy pass | times a copy pass |")
    print("| --- | --- | --- | --- | --- |")
    for threads, method, merge, copy in rows:
        ratio = merge / copy
        print(f"| {threads} | {method} | {merge:.3f} s | {copy * 1e3:.1f} ms | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
