"""The GPU path, checked in one run: file merges, in-memory materialization, scoring from memory
and a short search on one device, with one table printed and `gpu_check.json` written.

    python benchmarks/gpu_check.py                          # on a CUDA machine: about 5 minutes
    python benchmarks/gpu_check.py --device cpu --small     # the CPU form CI runs: under a minute

On a GPU machine without this project's Python dependencies (and no package index), fetch the
wheels on a machine with pip, then run both lines there (`benchmarks/gpu_wheels.sh` says how):

    bash benchmarks/gpu_wheels.sh .whl                      # here: exactly the wheels needed
    bash benchmarks/gpu_check.sh .whl                       # there: installs to /tmp, runs this

Sections (the `--small` sizes in brackets):
- merge: a random bf16 Llama family (base + 2 experts, about 1B [8M] parameters each), built on
  the device with a seeded generator and saved as safetensors; 3-model TIES and DARE-TIES file
  merges on the device, with wall time and bytes read + written per second. A smaller family
  (100M [8M]) is merged on the device and on the CPU: deterministic methods must give identical
  tensors, and DARE-TIES twice with one seed on the device must give identical masks.
- materialize: `ResidentMerger.materialize` per candidate for task_arithmetic, ties and
  dare_ties on the large family, against one `copy_` pass over the same output tensors on the
  same device (the bandwidth floor), in copy passes.
- scoring: the evaluator on the demo family's generate_until task from memory: seconds per
  candidate, documents and tokens per second, and the batch size `auto` chose and why.
- search: two generations of the demo search on the device, with the per-candidate split.
- environment: torch, transformers, lm-eval versions, the device's name, peak device memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from merge_vs_mergekit import (  # noqa: E402
    MODELS,
    RESIDENT_METHODS,
    TIES_PARAMS,
    Shape,
    compare_outputs,
    parse_count,
    recipe_dict,
    resident_bench,
    shape_for,
    weight_bytes,
    write_config,
)

BASE_STD, DELTA_STD = 0.02, 0.002
Row = tuple[str, str, str]  # section, measure, value


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_family(root: Path, shape: Shape, device: str) -> list[Path]:
    """base, expert1, expert2 (base + noise) in bf16, generated on `device`, one file each."""
    dirs = [root / name for name in MODELS]
    gen = torch.Generator(device=device).manual_seed(0)
    tensors: list[dict[str, torch.Tensor]] = [{} for _ in dirs]
    for name, tshape in shape.tensors():
        if len(tshape) == 1:
            base = torch.ones(tshape, device=device)
        else:
            base = torch.randn(tshape, generator=gen, device=device) * BASE_STD
        tensors[0][name] = base.to(torch.bfloat16).cpu()
        for out in tensors[1:]:
            noise = torch.randn(tshape, generator=gen, device=device) * DELTA_STD
            out[name] = (base + noise).to(torch.bfloat16).cpu()
    for folder, weights in zip(dirs, tensors, strict=True):
        folder.mkdir(parents=True)
        write_config(folder, shape)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return dirs


def file_merge(method: str, dirs: list[Path], out: Path, device: str, seed: int = 0) -> float:
    from evomerge.merge.materialize import run_merge
    from evomerge.merge.recipe import parse_recipe

    recipe = parse_recipe(
        recipe_dict(method, dirs, {d.name: TIES_PARAMS[d.name] for d in dirs[1:]})
    )
    started = time.perf_counter()
    run_merge(recipe, out, device=device, seed=seed, progress=False)
    sync(device)
    return time.perf_counter() - started


def merge_section(args, work: Path) -> tuple[list[Row], dict[str, Any]]:
    big = build_family(work / "big", shape_for(parse_count(args.params)), args.device)
    params = shape_for(parse_count(args.params)).params
    rows: list[Row] = [("merge", "family", f"{params / 1e6:.0f}M parameters x 3, bf16")]
    data: dict[str, Any] = {"params": params}
    for method in ("ties", "dare_ties"):
        seconds = file_merge(method, big, work / f"big-{method}", args.device)
        moved = sum(weight_bytes(d) for d in big) + weight_bytes(work / f"big-{method}")
        rows.append(
            (
                "merge",
                f"{method} on {args.device}",
                f"{seconds:.1f} s, {moved / seconds / 1e9:.2f} GB/s read + written",
            )
        )
        data[method] = {"seconds": seconds, "bytes": moved}
    small = build_family(work / "small", shape_for(parse_count(args.compare_params)), args.device)
    checks = {}
    if args.device != "cpu":
        file_merge("ties", small, work / "ties-dev", args.device)
        file_merge("ties", small, work / "ties-cpu", "cpu")
        worst = max(compare_outputs(work / "ties-dev", work / "ties-cpu").values())
        checks[f"ties {args.device} == cpu"] = worst == 0.0
        data["ties_device_vs_cpu_max_abs_diff"] = worst
    file_merge("dare_ties", small, work / "dare-1", args.device, seed=7)
    file_merge("dare_ties", small, work / "dare-2", args.device, seed=7)
    worst = max(compare_outputs(work / "dare-1", work / "dare-2").values())
    checks[f"dare_ties twice, seed 7, on {args.device}"] = worst == 0.0
    for name, ok in checks.items():
        rows.append(("merge", name, "identical" if ok else "DIFFERENT"))
    data["checks"] = checks
    data["family"] = [str(d) for d in big]
    return rows, data


def materialize_section(args, dirs: list[Path]) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    data: dict[str, Any] = {}
    for method in RESIDENT_METHODS:
        result = resident_bench(method, dirs, args.device, repeats=5, budget_s=30.0)
        ratio = result.materialize_s / result.copy_s
        rows.append(
            (
                "materialize",
                method,
                f"{result.materialize_s * 1e3:.1f} ms per candidate, "
                f"{ratio:.1f}x a copy pass ({result.copy_s * 1e3:.1f} ms)",
            )
        )
        data[method] = {
            "seconds": result.materialize_s,
            "copy_seconds": result.copy_s,
            "share_of_copy_speed": result.copy_s / result.materialize_s,
            "times_a_copy_pass": ratio,
            "calls": result.calls,
        }
    return rows, data


def scoring_section(args) -> tuple[list[Row], dict[str, Any]]:
    from evomerge.evals.evaluator import Evaluator
    from evomerge.evals.spec import parse_fitness_spec
    from evomerge.evals.suite import prepare_suites
    from evomerge.merge.recipe import parse_recipe
    from evomerge.merge.resident import ResidentMerger

    family = REPO / "demo" / "family"
    rows_range = "0:100" if args.small else "0:300"
    spec = parse_fitness_spec(
        {
            "tasks": [
                {"task": "demo_mixed", "metric": "exact_match", "rows": rows_range, "heldout": None}
            ]
        }
    )
    suites = prepare_suites(spec)
    recipe = parse_recipe(
        {
            "merge_method": "passthrough",
            "models": [{"model": str(family / "expert_a")}],
            "dtype": "float32",
        }
    )
    merger = ResidentMerger(recipe, device=args.device)
    evaluator = Evaluator(merger.build_model(), merger.tokenizer(), suites, log_samples=True)
    first = evaluator.score("fitness")
    runs = [evaluator.score("fitness") for _ in range(3)]
    seconds = statistics.median(r.seconds for r in runs)
    tokenizer = merger.tokenizer()
    samples = first.samples["demo_mixed"]
    tokens = sum(  # prompt and generated tokens (in memory, arguments are (prompt, kwargs))
        len(tokenizer(s["arguments"][0][0]).input_ids) + len(tokenizer(s["resps"][0][0]).input_ids)
        for s in samples
    )
    probe = first.settings.get("batch_probe") or {}
    rows: list[Row] = [
        (
            "scoring",
            "per candidate",
            f"{seconds:.2f} s for {len(samples)} documents, "
            f"{len(samples) / seconds:.0f} docs/s, {tokens / seconds:.0f} tokens/s",
        ),
        (
            "scoring",
            "batch size",
            f"{first.settings['batch_size']} ({probe.get('how')}, longest "
            f"request {probe.get('length')} tokens); decoding: {first.settings.get('decoding')}",
        ),
    ]
    data = {
        "seconds": seconds,
        "documents": len(samples),
        "tokens": tokens,
        "fitness": first.fitness,
        "batch_size": first.settings["batch_size"],
        "probe": probe,
        "decoding": first.settings.get("decoding"),
    }
    evaluator.close()
    return rows, data


def search_section(args, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import yaml

    from evomerge.search.config import load_search_recipe
    from evomerge.search.loop import Search

    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    family = REPO / "demo" / "family"
    recipe["merge"]["base_model"] = str(family / "base")
    recipe["merge"]["models"] = [{"model": str(family / n)} for n in ("expert_a", "expert_b")]
    population = 4 if args.small else 8
    recipe.update(device=args.device, budget={"evaluations": 2 * population})
    recipe["optimizer"]["population"] = population
    if args.small:
        recipe["fitness"]["tasks"][0]["rows"] = "0:60"
    path = work / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started = time.perf_counter()
    search = Search.prepare(load_search_recipe(path), work / "search")
    summary = search.run(echo=lambda _: None, progress=False, write_model=False)
    wall = time.perf_counter() - started
    done = [t for t in summary.trials if not t.outcome.failed]
    split = {
        stage: statistics.mean(t.outcome.seconds.get(stage, 0.0) for t in done)
        for stage in ("materialize", "evaluate", "optimizer")
    }
    rows: list[Row] = [
        (
            "search",
            "trials",
            f"{len(done)} of {len(summary.trials)} completed in {wall:.1f} s "
            f"(best fitness {summary.best.outcome.fitness:.3f})",
        ),
        ("search", "per candidate", ", ".join(f"{k} {v:.3f} s" for k, v in split.items())),
    ]
    return rows, {
        "wall_seconds": wall,
        "trials": len(summary.trials),
        "completed": len(done),
        "split": split,
        "best_fitness": summary.best.outcome.fitness,
    }


def environment(device: str) -> tuple[list[Row], dict[str, Any]]:
    versions = {name: version(name) for name in ("torch", "transformers", "lm_eval")}
    data: dict[str, Any] = {"python": platform.python_version(), **versions}
    if device.startswith("cuda"):
        data["device_name"] = torch.cuda.get_device_name(device)
        data["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        data["device_name"] = platform.processor() or platform.machine()
        data["torch_threads"] = torch.get_num_threads()
    text = ", ".join(f"{k} {v}" for k, v in versions.items())
    rows: list[Row] = [
        ("environment", "versions", f"python {data['python']}, {text}"),
        ("environment", "device", str(data["device_name"])),
    ]
    if "max_memory_allocated_gb" in data:
        rows.append(
            ("environment", "peak device memory", f"{data['max_memory_allocated_gb']:.1f} GB")
        )
    return rows, data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="small sizes (the CPU form)")
    parser.add_argument("--workdir", type=Path, help="where the families go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    args.params = "8M" if args.small else "1B"
    args.compare_params = "8M" if args.small else "100M"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: torch {torch.__version__} sees no CUDA device; "
            "use --device cpu --small"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="evomerge-gpu-check-"))
    report: dict[str, Any] = {"device": args.device, "small": args.small}
    rows: list[Row] = []
    try:
        for name, run in (
            ("merge", lambda: merge_section(args, work)),
            (
                "materialize",
                lambda: materialize_section(args, [Path(p) for p in report["merge"]["family"]]),
            ),
            ("scoring", lambda: scoring_section(args)),
            ("search", lambda: search_section(args, work)),
        ):
            started = time.perf_counter()
            section_rows, report[name] = run()
            report[name]["section_seconds"] = time.perf_counter() - started
            rows += section_rows
            print(f"{name}: done in {report[name]['section_seconds']:.0f} s", flush=True)
        env_rows, report["environment"] = environment(args.device)
        rows += env_rows
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"| {'section'.ljust(widths[0])} | {'measure'.ljust(widths[1])} | value |")
    print(f"| {'-' * widths[0]} | {'-' * widths[1]} | --- |")
    for section, measure, value in rows:
        print(f"| {section.ljust(widths[0])} | {measure.ljust(widths[1])} | {value} |")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
