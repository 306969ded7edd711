"""Benchmark evomerge against mergekit on a synthetic bf16 Llama family.

Run (from the repository root, with the project's virtual environment active):

    python benchmarks/merge_vs_mergekit.py --params 0.5B --workdir /tmp/bench

What it does:

1. Builds, once, a random Llama checkpoint family (a base and two experts = base + small noise),
   bf16, two safetensors shards each with an index json, under WORKDIR/family-<N>M/. Later
   runs reuse it (about 1 GB per model at 0.5B; about 50 s to build on 2 cores).
2. Runs the same 3-model TIES recipe (`--file-method task_arithmetic` for an I/O-bound one)
   through `evomerge merge` with its default selection (mergekit's sort: mergekit's tensors),
   through `evomerge merge` with `selection: fast` (linear-time cut) and through `mergekit-yaml`,
   as child processes, in turn, and reports wall time, the child's peak RSS (exact, from
   os.wait4) and its sampled peak anonymous RSS, and input+output bytes per second. The page
   cache is not dropped (that needs root): the family is read once beforehand, so every run is
   warm. Then it compares each evomerge output with mergekit's tensor by tensor (max abs
   difference, in float32; the fast selection differs only among ties at the cut).
3. Times the in-memory API (`ResidentMerger.materialize`) for task_arithmetic, ties and
   dare_ties with the fast selection (what searches use) on a family of `--resident-params`
   parameters (100M by default), against one `dst.copy_(src)` pass
   over the same output tensors. With a CUDA device present it also runs there.

TIES at 0.5B is sort-bound in both tools (about 1.5-3 min a run on 2 busy cores), so the
default run takes 10-15 min; `--threads 1` avoids OpenMP oversubscription on a shared machine.
Add `--profile` to run one more evomerge merge under cProfile and print where its time goes.
Big files go to WORKDIR only; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EXPERTS = ("expert1", "expert2")
MODELS = ("base", *EXPERTS)
BASE_STD = 0.02
DELTA_STD = 0.002
TIES_PARAMS = {
    "expert1": {"weight": 0.6, "density": 0.5},
    "expert2": {"weight": 0.4, "density": 0.5},
}
TA_PARAMS = {"expert1": {"weight": 0.6}, "expert2": {"weight": 0.4}}
RESIDENT_METHODS = {"task_arithmetic": TA_PARAMS, "ties": TIES_PARAMS, "dare_ties": TIES_PARAMS}


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoint family


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden, self.intermediate
        names = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            names += [(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
            names += [(f"{p}.mlp.{x}_proj.weight", (i, h)) for x in ("gate", "up")]
            names += [(f"{p}.mlp.down_proj.weight", (h, i))]
            names += [(f"{p}.input_layernorm.weight", (h,))]
            names += [(f"{p}.post_attention_layernorm.weight", (h,))]
        names += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return names

    @property
    def params(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensors())

    @property
    def millions(self) -> int:
        return round(self.params / 1e6)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_count(text: str) -> int:
    """'0.5B' -> 500_000_000, '100M' -> 100_000_000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count like 0.5B or 100M")
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[match[2].upper()]
    return int(float(match[1]) * scale)


def shape_for(n_params: int) -> Shape:
    """A Llama shape (vocab 32000, untied head) with about n_params parameters."""
    if n_params >= 300_000_000:
        hidden, inter, heads = 1024, 2816, 16
    elif n_params >= 60_000_000:
        hidden, inter, heads = 768, 2048, 12
    else:
        hidden, inter, heads = 256, 688, 4
    outer = 2 * 32000 * hidden + hidden
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(2, round((n_params - outer) / per_layer))
    return Shape(hidden, inter, layers, heads)


def write_config(model_dir: Path, shape: Shape) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _random(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * std


def family_tensors(name: str, shape: tuple[int, ...], index: int) -> list[torch.Tensor]:
    """The base tensor and the two experts' (base + noise), in bf16."""
    is_norm = len(shape) == 1
    base = torch.ones(shape) if is_norm else _random(shape, BASE_STD, 3 * index)
    out = [base.to(torch.bfloat16)]
    for k in (1, 2):
        out.append((base + _random(shape, DELTA_STD, 3 * index + k)).to(torch.bfloat16))
    return out


def _save_shard(dirs: list[Path], shards: list[dict], number: int, weight_maps: list[dict]) -> None:
    fname = f"model-{number:05d}-of-00002.safetensors"
    for model_dir, shard, weight_map in zip(dirs, shards, weight_maps, strict=True):
        save_file(shard, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        shard.clear()


def build_family(root: Path, shape: Shape) -> list[Path]:
    """Write base/expert1/expert2 under root (reused if the same shape is already there)."""
    dirs = [root / m for m in MODELS]
    stamp = root / "family.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == shape.__dict__:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs:
        d.mkdir(parents=True)
        write_config(d, shape)
    start = time.perf_counter()
    specs = shape.tensors()
    half = shape.params  # bytes of half the bf16 weights
    shards: list[dict] = [{} for _ in dirs]
    weight_maps: list[dict] = [{} for _ in dirs]
    done_bytes = 0
    for index, (name, tshape) in enumerate(specs):
        for shard, tensor in zip(shards, family_tensors(name, tshape, index), strict=True):
            shard[name] = tensor
        done_bytes += 2 * _numel(tshape)
        if len(weight_maps[0]) == 0 and done_bytes >= half:
            _save_shard(dirs, shards, 1, weight_maps)
    _save_shard(dirs, shards, 2, weight_maps)
    for d, weight_map in zip(dirs, weight_maps, strict=True):
        index_json = {"metadata": {"total_size": 2 * shape.params}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    stamp.write_text(json.dumps(shape.__dict__))
    took = time.perf_counter() - start
    print(f"built {root} ({shape.millions}M params x 3) in {took:.0f} s")
    return dirs


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def warm_cache(dirs: list[Path]) -> None:
    for d in dirs:
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as handle:
                while handle.read(1 << 24):
                    pass


# ---------------------------------------------------------------------------------------------
# Recipes


def recipe_dict(method: str, dirs: list[Path], params: dict) -> dict:
    return {
        "merge_method": method,
        "base_model": str(dirs[0]),
        "models": [{"model": str(d), "parameters": params[d.name]} for d in dirs[1:]],
        "dtype": "bfloat16",
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# File merges as child processes


@dataclass
class Run:
    tool: str
    wall_s: float
    peak_rss_mb: float
    peak_anon_mb: float
    io_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.io_bytes / self.wall_s / 1e6


def _proc_kb(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
    return int(match[1]) if match else 0


def timed(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Wall s, exact peak RSS MB (wait4's ru_maxrss) and sampled peak anonymous RSS MB."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        anon_kb = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon_kb = max(anon_kb, _proc_kb(proc.pid, "RssAnon"))
            time.sleep(0.1)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        sys.exit(f"{' '.join(cmd)} failed (rc {proc.returncode}); see {log}:\n{tail}")
    return wall, usage.ru_maxrss / 1024, anon_kb / 1024


TOOLS = ("evomerge", "evomerge-fast", "mergekit")  # evomerge-fast: the recipe + selection: fast


def fast_recipe(recipe: Path) -> Path:
    return recipe.with_name(f"{recipe.stem}-fast.yaml")


def merge_command(tool: str, recipe: Path, out: Path, device: str) -> list[str]:
    if tool.startswith("evomerge"):
        file = fast_recipe(recipe) if tool == "evomerge-fast" else recipe
        return ["evomerge", "merge", str(file), str(out), "--device", device]
    cmd = ["mergekit-yaml", str(recipe), str(out)]
    return [*cmd, "--cuda"] if device == "cuda" else cmd


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_tool(
    tool: str, recipe: Path, out: Path, device: str, in_bytes: int, log: Path, env: dict[str, str]
) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    wall, rss, anon = timed(merge_command(tool, recipe, out, device), log, env)
    return Run(tool, wall, rss, anon, in_bytes + weight_bytes(out))


def startup_seconds(tool: str, workdir: Path, env: dict[str, str]) -> float:
    return timed([tool, "--help"], workdir / f"{tool}-help.log", env)[0]


def file_merges(
    recipe: Path, dirs: list[Path], workdir: Path, device: str, rounds: int, env: dict[str, str]
) -> list[Run]:
    in_bytes = sum(weight_bytes(d) for d in dirs)
    runs: list[Run] = []
    for r in range(rounds):
        for tool in TOOLS:
            out = workdir / f"out-{tool}-{device}"
            log = workdir / f"{tool}-{device}-{r}.log"
            run = run_tool(tool, recipe, out, device, in_bytes, log, env)
            print(
                f"  {tool:13s} run {r + 1}: {run.wall_s:6.1f} s, peak RSS {run.peak_rss_mb:6.0f} MB"
                f" (anonymous {run.peak_anon_mb:.0f} MB)"
            )
            runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# Output comparison


def tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / f for name, f in weight_map.items()}
    files: dict[str, Path] = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), f))
    return files


def compare_outputs(a: Path, b: Path) -> dict[str, float]:
    """Max abs difference (float32) per tensor; raises if the tensor sets differ."""
    files_a, files_b = tensor_files(a), tensor_files(b)
    if set(files_a) != set(files_b):
        only = sorted(set(files_a) ^ set(files_b))[:5]
        raise SystemExit(f"outputs hold different tensors, e.g. {only}")
    diffs = {}
    for name in files_a:
        with safe_open(str(files_a[name]), "pt") as ha, safe_open(str(files_b[name]), "pt") as hb:
            ta, tb = ha.get_tensor(name), hb.get_tensor(name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise SystemExit(f"{name}: {ta.shape} {ta.dtype} vs {tb.shape} {tb.dtype}")
        diffs[name] = (ta.float() - tb.float()).abs().max().item()
    return diffs


def print_diffs(diffs: dict[str, float], listing: Path) -> None:
    listing.write_text("".join(f"{d:.6g}\t{n}\n" for n, d in diffs.items()))
    equal = sum(d == 0 for d in diffs.values())
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    print(f"  {equal}/{len(diffs)} tensors bit-identical; max abs diff {worst[0][1]:.3g}")
    for name, d in worst:
        if d > 0:
            print(f"    {d:.3g}  {name}")
    print(f"  (per-tensor max abs diffs in {listing})")


# ---------------------------------------------------------------------------------------------
# In-memory merging


@dataclass
class ResidentResult:
    method: str
    device: str
    setup_s: float
    resident_gb: float
    materialize_s: float
    calls: int
    copy_s: float

    @property
    def ratio(self) -> float:
        return self.materialize_s / self.copy_s


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, budget_s: float) -> tuple[float, int]:
    """Median seconds of up to `repeats` calls, stopping early once `budget_s` is spent."""
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def copy_pass_seconds(model: torch.nn.Module, device: str, repeats: int) -> float:
    """One `dst.copy_(src)` over every parameter of the model: the bandwidth floor."""
    dst = [p.data for p in model.parameters()]
    src = [t.clone() for t in dst]

    def copy_all() -> None:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    copy_all()  # warm-up
    return median_time(copy_all, device, repeats, budget_s=float("inf"))[0]


def resident_bench(
    method: str, dirs: list[Path], device: str, repeats: int, budget_s: float
) -> ResidentResult:
    """Setup (load, deltas, build_model, whose first materialize is the warm-up), then time."""
    from evomerge.merge.recipe import parse_recipe
    from evomerge.merge.resident import ResidentMerger

    recipe = parse_recipe(
        {**recipe_dict(method, dirs, RESIDENT_METHODS[method]), "selection": "fast"}
    )
    start = time.perf_counter()
    merger = ResidentMerger(recipe, device=device)
    model = merger.build_model()
    _sync(device)
    setup = time.perf_counter() - start
    with torch.no_grad():
        mat, calls = median_time(lambda: merger.materialize(model), device, repeats, budget_s)
        copy = copy_pass_seconds(model, device, repeats)
    gb = merger.resident_bytes() / 1e9
    return ResidentResult(method, device, setup, gb, mat, calls, copy)


# ---------------------------------------------------------------------------------------------
# Profiling


def profile_evomerge(recipe: Path, workdir: Path, device: str, top: int = 25) -> None:
    """One more evomerge file merge in this process under cProfile; prints the top entries."""
    from evomerge.merge.materialize import run_merge
    from evomerge.merge.recipe import load_recipe

    out = workdir / "out-evomerge-profile"
    shutil.rmtree(out, ignore_errors=True)
    profiler = cProfile.Profile()
    profiler.enable()
    run_merge(load_recipe(recipe), out, device=device, progress=False)
    profiler.disable()
    stats_file = workdir / "evomerge.prof"
    profiler.dump_stats(stats_file)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    print(f"(cProfile stats in {stats_file}; the writer thread is not profiled)")


# ---------------------------------------------------------------------------------------------
# Report


def file_table(runs: list[Run], startup: dict[str, float], title: str) -> list[str]:
    """Median per tool, and each evomerge selection's median over mergekit's."""
    medians = {
        tool: {
            attr: statistics.median(getattr(r, attr) for r in runs if r.tool == tool)
            for attr in ("wall_s", "peak_rss_mb", "peak_anon_mb", "mb_per_s")
        }
        for tool in TOOLS
    }
    rounds = sum(r.tool == "mergekit" for r in runs)
    head = "".join(f"{tool:>15s}" for tool in TOOLS) + f"{'evo/mk':>9s}{'fast/mk':>9s}"
    lines = [f"{title:26s}{head}", f"{f'(median of {rounds} rounds)':26s}"]
    labels = {
        "wall_s": ("wall time [s]", ".1f"),
        "peak_rss_mb": ("peak RSS [MB]", ".0f"),
        "peak_anon_mb": ("  of it anonymous [MB]", ".0f"),
        "mb_per_s": ("read+write [MB/s]", ".0f"),
    }
    for attr, (label, fmt) in labels.items():
        cells = "".join(f"{format(medians[t][attr], fmt):>15s}" for t in TOOLS)
        mk = medians["mergekit"][attr]
        ratios = (
            f"{medians['evomerge'][attr] / mk:>8.2f}x{medians['evomerge-fast'][attr] / mk:>8.2f}x"
        )
        lines.append(f"{label:26s}{cells}{ratios}")
    if startup:
        cells = "".join(f"{startup[t]:>15.1f}" for t in ("evomerge", "evomerge", "mergekit-yaml"))
        lines.append(f"{'CLI start (--help) [s]':26s}{cells}")
    return lines


def resident_table(results: list[ResidentResult]) -> list[str]:
    lines = [
        f"{'in-memory materialize':22s}{'device':>7s}{'resident':>10s}{'setup':>8s}"
        f"{'materialize':>13s}{'calls':>6s}{'copy pass':>11s}{'x copy':>8s}"
    ]
    for r in results:
        lines.append(
            f"{r.method:22s}{r.device:>7s}{r.resident_gb:>8.2f}GB{r.setup_s:>7.1f}s"
            f"{r.materialize_s * 1e3:>11.0f}ms{r.calls:>6d}{r.copy_s * 1e3:>9.1f}ms{r.ratio:>8.1f}"
        )
    return lines


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params",
        type=parse_count,
        default=parse_count("0.5B"),
        help="size of the family for the file merges (default 0.5B)",
    )
    parser.add_argument(
        "--resident-params",
        type=parse_count,
        default=parse_count("100M"),
        help="size of the family for the in-memory benchmark (default 100M)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CPU, plus CUDA when present",
    )
    parser.add_argument(
        "--file-method",
        choices=["ties", "task_arithmetic"],
        default="ties",
        help="method of the CLI comparison (task_arithmetic: I/O-bound)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each CLI (alternating)")
    parser.add_argument("--repeats", type=int, default=5, help="most timed materialize() calls")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=30.0,
        help="stop timing a method's materialize() after this many seconds",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch/OpenMP threads for both tools and the in-memory part "
        "(0: library default, one per core)",
    )
    parser.add_argument("--skip-files", action="store_true", help="skip the CLI comparison")
    parser.add_argument("--skip-resident", action="store_true", help="skip the in-memory part")
    parser.add_argument("--profile", action="store_true", help="cProfile one evomerge merge")
    return parser.parse_args(argv)


def devices(choice: str) -> list[str]:
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if choice == "cpu":
        return ["cpu"]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def family(workdir: Path, n_params: int) -> tuple[Shape, list[Path]]:
    shape = shape_for(n_params)
    dirs = build_family(workdir / f"family-{shape.millions}M", shape)
    return shape, dirs


def describe(shape: Shape, dirs: list[Path]) -> str:
    gb = sum(weight_bytes(d) for d in dirs) / 1e9
    return (
        f"{shape.millions}M params (hidden {shape.hidden}, intermediate "
        f"{shape.intermediate}, {shape.layers} layers, vocab {shape.vocab}), bf16, "
        f"3 models = {gb:.2f} GB of shards"
    )


def file_part(args, devs: list[str]) -> list[str]:
    shape, dirs = family(args.workdir, args.params)
    print(f"file merges ({args.file_method}): {describe(shape, dirs)}")
    params = TIES_PARAMS if args.file_method == "ties" else TA_PARAMS
    recipe = args.workdir / f"{args.file_method}.yaml"
    write_recipe(recipe, recipe_dict(args.file_method, dirs, params))
    write_recipe(fast_recipe(recipe), {**recipe_dict(args.file_method, dirs, params),
                                       "selection": "fast"})  # fmt: skip
    warm_cache(dirs)
    env = child_env(args.threads)
    startup = {t: startup_seconds(t, args.workdir, env) for t in ("evomerge", "mergekit-yaml")}
    lines = []
    for device in devs:
        runs = file_merges(recipe, dirs, args.workdir, device, args.rounds, env)
        for tool in ("evomerge", "evomerge-fast"):
            diffs = compare_outputs(
                args.workdir / f"out-{tool}-{device}", args.workdir / f"out-mergekit-{device}"
            )
            print(f"  output agreement, {tool} vs mergekit ({device}):")
            print_diffs(diffs, args.workdir / f"diffs-{tool}-{device}.tsv")
        title = f"{args.file_method} {shape.millions}M {device}"
        lines += [*file_table(runs, startup, title), ""]
        startup = {}
    if args.profile:
        profile_evomerge(recipe, args.workdir, devs[0])
    return lines


def resident_part(args, devs: list[str]) -> list[str]:
    shape, dirs = family(args.workdir, args.resident_params)
    print(f"in-memory: {describe(shape, dirs)}; {torch.get_num_threads()} torch threads")
    results = []
    for device in devs:
        for method in RESIDENT_METHODS:
            result = resident_bench(method, dirs, device, args.repeats, args.budget_s)
            print(f"  {method} on {device}: {result.materialize_s * 1e3:.0f} ms")
            results.append(result)
    title = f"in-memory, {shape.millions}M-param family (--resident-params)"
    return [title, *resident_table(results)]


def notes(args, devs: list[str]) -> list[str]:
    threads = args.threads or f"default ({torch.get_num_threads()})"
    lines = [
        f"Threads: {threads}. Before: {args.load_before}. After: {load_line()}.",
        "File merges: warm page cache (the family was read first; dropping it needs root); the",
        "ratio column is median(evomerge) / median(mergekit); read+write = (input shard bytes +",
        "output shard bytes) / wall. Peak RSS is the child's ru_maxrss (exact) and includes",
        "mmap'ed file pages; 'anonymous' is RssAnon sampled every 0.1 s.",
        "materialize: median of up to --repeats calls within --budget-s (build_model's own",
        "materialize is the warm-up); 'x copy' = materialize / one copy_ pass over the same",
        "output tensors; a task-vector merge reads base + 2 deltas and writes the output, so",
        "about 2x copy is its memory-traffic floor.",
    ]
    if "cuda" not in devs:
        lines.append("No CUDA device here: GPU numbers need a machine with one (--device cuda).")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.load_before = load_line()
    if args.threads:
        torch.set_num_threads(args.threads)
    devs = devices(args.device)
    start = time.perf_counter()
    lines = [] if args.skip_files else file_part(args, devs)
    if not args.skip_resident:
        lines += resident_part(args, devs)
    print("\n" + "=" * 100)
    print("\n".join([*lines, "", *notes(args, devs)]))
    print(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
