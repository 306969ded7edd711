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
  (100M [8M]) is merged on the device and on the CPU: TIES with fast selection must give
  identical tensors (mergekit's selection may keep other entries of equal magnitude at the cut),
  and DARE-TIES twice with one seed on the device must give identical masks.
- materialize: `ResidentMerger.materialize` per candidate for task_arithmetic, ties (fast
  selection), dare_ties and della on the large family, with the sources on the device and on
  the host (streamed), against one `copy_` pass over the same output tensors on the same device
  (the bandwidth floor), in copy passes; on CUDA the merge's peak device memory beyond the model
  and the resident sources against the memory plan's workspace (+ two tasks' inputs streamed).
  Checks: host placement equals device placement bit for bit (large family), and each
  placement's candidate equals the file merge of the same recipe and seed (small family).
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
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from merge_vs_mergekit import (  # noqa: E402
    MODELS,
    TA_PARAMS,
    TIES_PARAMS,
    Shape,
    compare_outputs,
    copy_pass_seconds,
    median_time,
    parse_count,
    recipe_dict,
    shape_for,
    weight_bytes,
    write_config,
)

BASE_STD, DELTA_STD = 0.02, 0.002
Row = tuple[str, str, str]  # section, measure, value
SECTIONS = ("merge", "materialize", "scoring", "search")


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


def file_merge(
    method: str, dirs: list[Path], out: Path, device: str, seed: int = 0, **shared: Any
) -> float:
    from evomerge.merge.recipe import parse_recipe

    recipe = parse_recipe({**recipe_dict(method, dirs, TIES_PARAMS), **shared})
    return file_merge_recipe(recipe, out, device, seed)


def file_merge_recipe(recipe, out: Path, device: str, seed: int = 0) -> float:
    from evomerge.merge.materialize import run_merge

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
        # Fast selection keeps equal magnitudes at the cut in index order on every device;
        # mergekit's (an unstable sort, of float32 keys on a CPU and 16-bit ones on a GPU) keeps
        # an arbitrary subset of them, so only the fast one must match across devices.
        for selection in ("fast", "mergekit"):
            outs = [work / f"ties-{selection}-{d}" for d in (args.device, "cpu")]
            for out, device in zip(outs, (args.device, "cpu"), strict=True):
                file_merge("ties", small, out, device, selection=selection)
            diffs = compare_outputs(*outs)
            data[f"ties_{selection}_device_vs_cpu"] = {
                "max_abs_diff": max(diffs.values()),
                "tensors_differing": sum(d > 0 for d in diffs.values()),
                "tensors": len(diffs),
            }
        fast = data["ties_fast_device_vs_cpu"]
        checks[f"ties, selection: fast, {args.device} == cpu"] = fast["max_abs_diff"] == 0.0
        other = data["ties_mergekit_device_vs_cpu"]
        rows.append(
            (
                "merge",
                f"ties, selection: mergekit, {args.device} vs cpu",
                f"{other['tensors_differing']} of {other['tensors']} tensors differ, max abs "
                f"diff {other['max_abs_diff']:.2g} (equal magnitudes at the cut, expected)",
            )
        )
    file_merge("dare_ties", small, work / "dare-1", args.device, seed=7)
    file_merge("dare_ties", small, work / "dare-2", args.device, seed=7)
    worst = max(compare_outputs(work / "dare-1", work / "dare-2").values())
    checks[f"dare_ties twice, seed 7, on {args.device}"] = worst == 0.0
    for name, ok in checks.items():
        rows.append(("merge", name, "identical" if ok else "DIFFERENT"))
    data["checks"] = checks
    data["family"] = [str(d) for d in big]
    data["small_family"] = [str(d) for d in small]
    return rows, data


PLACED_METHODS = {  # method: (per-model parameters by model, recipe-wide parameters)
    "task_arithmetic": (TA_PARAMS, {}),
    "ties": (TIES_PARAMS, {"selection": "fast"}),
    "dare_ties": (TIES_PARAMS, {}),
    "della": ({m: {**p, "epsilon": 0.1} for m, p in TIES_PARAMS.items()}, {}),
}


def placed_recipe(method: str, dirs: list[Path]):
    from evomerge.merge.recipe import parse_recipe

    params, shared = PLACED_METHODS[method]
    return parse_recipe({**recipe_dict(method, dirs, params), **shared})


def materialize_once(merger, model, device: str) -> int:
    """One candidate; on CUDA, the bytes allocated at the peak beyond what was held before."""
    if not device.startswith("cuda"):
        merger.materialize(model)
        return 0
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    merger.materialize(model)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def profile(label: str, fn, device: str, rows: int = 12) -> None:
    """Prints the operators that took the most time in one call of `fn` (device time on CUDA)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"== profile: {label} on {device} ==")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40))


def same_tensors(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return all(torch.equal(state[name], tensor) for name, tensor in reference.items())


def materialize_section(args, dirs: list[Path], small: list[Path]) -> tuple[list[Row], dict]:
    """Per candidate against a copy pass, by method and placement of the sources, on the large
    family; host placement equal to device placement bit for bit; on CUDA the merge's extra
    device memory against the memory plan. On the small family, each placement's candidate
    against the file merge of the same recipe and seed on the same device."""
    from evomerge.merge.materialize import output_config
    from evomerge.merge.memory import plan_memory
    from evomerge.merge.resident import ResidentMerger

    rows: list[Row] = []
    data: dict[str, Any] = {"checks": {}}
    copy_s = None
    repeats = 2 if args.small else 5
    for method in PLACED_METHODS:
        recipe = placed_recipe(method, dirs)
        reference: dict[str, torch.Tensor] = {}
        data[method] = {}
        for placement in ("device", "host"):
            merger = ResidentMerger(recipe, device=args.device, placement=placement)
            model = merger.build_model()
            if copy_s is None:
                copy_s = copy_pass_seconds(model, args.device, repeats=5)
            extra = materialize_once(merger, model, args.device)
            seconds, calls = median_time(
                lambda m=merger, mod=model: m.materialize(mod), args.device, repeats, 30.0
            )
            plan = plan_memory(merger.plan, output_config(merger.plan), device=args.device)
            planned = plan.workspace + (0 if placement == "device" else plan.streamed)
            entry = {
                "seconds": seconds,
                "copy_seconds": copy_s,
                "times_a_copy_pass": seconds / copy_s,
                "calls": calls,
                "planned_extra_bytes": planned,
            }
            text = f"{seconds * 1e3:.1f} ms, {seconds / copy_s:.1f}x a copy pass"
            if placement == "host":  # every resident byte crosses to the device once
                entry["streamed_gb_per_s"] = merger.resident_bytes() / seconds / 1e9
                text += f", sources streamed at {entry['streamed_gb_per_s']:.1f} GB/s"
            if args.device.startswith("cuda"):
                entry["measured_extra_bytes"] = extra
                text += f"; merge memory {extra / 2**20:.0f} MiB, planned {planned / 2**20:.0f}"
            if placement == "device":
                reference = {k: v.clone() for k, v in model.state_dict().items()}
                if args.profile:
                    profile(method, lambda m=merger, mod=model: m.materialize(mod), args.device)
            else:
                data["checks"][f"{method}: host == device"] = same_tensors(model, reference)
            data[method][placement] = entry
            rows.append(("materialize", f"{method}, sources on {placement}", text))
            del merger, model
        del reference
    for method in PLACED_METHODS:
        recipe = placed_recipe(method, small)
        out = small[0].parent / f"file-{method}"
        file_merge_recipe(recipe, out, args.device)
        files = {}
        for path in out.glob("*.safetensors"):
            with safe_open(str(path), "pt", device=args.device) as handle:
                files.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
        for placement in ("device", "host"):
            merger = ResidentMerger(recipe, device=args.device, placement=placement)
            model = merger.build_model()
            state = model.state_dict()
            data["checks"][f"{method}, sources on {placement} == file merge"] = all(
                name in state and torch.equal(state[name], t) for name, t in files.items()
            )
        shutil.rmtree(out)
    copy_text = f"{copy_s * 1e3:.1f} ms" if copy_s else "-"
    rows.insert(0, ("materialize", "copy pass (the floor)", copy_text))
    for name, ok in data["checks"].items():
        rows.append(("materialize", name, "identical" if ok else "DIFFERENT"))
    if args.device.startswith("cuda"):
        worst = max(
            abs(e["measured_extra_bytes"] - e["planned_extra_bytes"]) / e["measured_extra_bytes"]
            for m in PLACED_METHODS
            for e in data[m].values()
            if e["measured_extra_bytes"]
        )
        data["worst_plan_error"] = worst
        rows.append(("materialize", "memory plan vs measured (worst)", f"{worst:.1%}"))
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
    parser.add_argument(
        "--profile", action="store_true", help="print each method's top operators (one call)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which to run, in order (materialize needs merge's families)",
    )
    args = parser.parse_args(argv)
    args.params = "8M" if args.small else "1B"
    args.compare_params = "8M" if args.small else "100M"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: torch {torch.__version__} sees no CUDA device; "
            "use --device cpu --small"
        )
    return args


def print_table(rows: list[Row]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"| {'section'.ljust(widths[0])} | {'measure'.ljust(widths[1])} | value |")
    print(f"| {'-' * widths[0]} | {'-' * widths[1]} | --- |")
    for section, measure, value in rows:
        print(f"| {section.ljust(widths[0])} | {measure.ljust(widths[1])} | {value} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the sections asked for in order; one that fails is reported with its error and the
    rest still run (the report is rewritten after each), then the check fails."""
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="evomerge-gpu-check-"))
    report: dict[str, Any] = {"device": args.device, "small": args.small}
    rows: list[Row] = []
    sections = {
        "merge": lambda: merge_section(args, work),
        "materialize": lambda: materialize_section(
            args,
            [Path(p) for p in report["merge"]["family"]],
            [Path(p) for p in report["merge"]["small_family"]],
        ),
        "scoring": lambda: scoring_section(args),
        "search": lambda: search_section(args, work),
    }
    failed = []
    try:
        for name in args.sections:
            started = time.perf_counter()
            try:
                section_rows, report[name] = sections[name]()
            except Exception as error:  # the other sections still say what they can
                traceback.print_exc()
                failed.append(name)
                section_rows, report[name] = [(name, "FAILED", repr(error))], {"error": repr(error)}
            report[name]["section_seconds"] = time.perf_counter() - started
            rows += section_rows
            print(f"{name}: done in {report[name]['section_seconds']:.0f} s", flush=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        env_rows, report["environment"] = environment(args.device)
        rows += env_rows
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failed:
        raise SystemExit(f"gpu_check: sections failed: {', '.join(failed)} (tracebacks above)")
    return report


if __name__ == "__main__":
    main()
