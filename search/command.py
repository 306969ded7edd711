"""`evomerge search RECIPE [--out DIR] [--resume] [--dry-run]`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evomerge.search.config import (
    PsDfsSpec,
    SearchRecipe,
    load_search_recipe,
    parse_search_recipe,
)
from evomerge.search.errors import SearchError
from evomerge.search.loop import Search, make_space
from evomerge.search.optimizers import default_population

MAX_GENES_LISTED = 40  # --dry-run lists this many genes, then counts the rest
# Generation throughput assumed by --dry-run for a 7B model (HF transformers, greedy, batch 32,
# one H100), whatever the recipe's models (larger ones are slower). Measure yours with
# `evomerge eval`.
TOKENS_PER_SECOND_7B = 1500.0
# lm-eval's HFLM generates at most this many tokens when neither the spec nor the task says.
DEFAULT_MAX_GEN_TOKS = 256


def run_search_command(
    recipe_path: Path,
    *,
    out: Path | None,
    resume: bool,
    dry_run: bool,
    allow_changed_sources: bool = False,
    device: str | None,
    storage: str | None,
    echo: Callable[[str], None],
    allow_pickle: bool = False,
    executor: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    sources: str | None = None,
    progress: bool = True,
) -> None:
    recipe = load_search_recipe(recipe_path)
    overrides = {
        "device": device,
        "allow_pickle": allow_pickle or None,
        "executor": executor,
        "ray_address": ray_address,
        "workers": workers,
        "sources": sources,
    }
    update = {k: v for k, v in overrides.items() if v is not None}
    if update:  # validated like the recipe's own fields
        recipe = parse_search_recipe(
            {**recipe.model_dump(mode="json", exclude_none=True), **update}, str(recipe_path)
        )
    out = out or recipe.out or Path("runs") / recipe_path.stem
    if allow_changed_sources and not resume:
        raise SearchError("--allow-changed-sources: only with --resume (a new study records "
                          "the sources as they are)")  # fmt: skip
    if dry_run:
        describe(recipe, recipe_path, echo)
        return
    search = Search.prepare(recipe, out, storage=storage, title=recipe_path.stem)
    try:
        search.run(resume=resume, echo=echo, progress=progress,
                   allow_changed_sources=allow_changed_sources)  # fmt: skip
    except SearchError:
        raise
    except KeyboardInterrupt:
        echo("interrupted; every finished trial is recorded: --resume continues")
        raise


def describe(recipe: SearchRecipe, path: Path, echo: Callable[[str], None]) -> None:
    """Validate the recipe and print the space, the budget and a cost estimate, offline."""
    from evomerge.evals.catalog import TaskCatalog
    from evomerge.search import baselines
    from evomerge.search.loop import num_layers, preflight

    planned = preflight(recipe)
    if isinstance(recipe.space, PsDfsSpec):
        from evomerge.search.stages import stage_recipes

        # Stage 2 runs on stage 1's merge, which has the base model's architecture.
        stages = stage_recipes(recipe, Path("."), model_a=recipe.merge.base_model)
        for stage, what in zip(stages, ("1 of 2: parameter", "2 of 2: data-flow"), strict=True):
            echo(f"== stage {what} space ==")
            describe(stage, path, echo)
        return
    layers = num_layers(recipe)
    space = make_space(recipe)
    spec = recipe.fitness
    catalog = TaskCatalog(spec.include_path)
    names = [e.task for split in ("fitness", "heldout") for e in spec.entries(split)]
    catalog.check(names)
    manager = catalog.manager(names)
    for split in ("fitness", "heldout"):
        for entry in spec.entries(split):
            _check_entry(entry, manager.task_index[entry.task], split)
    m = recipe.merge
    models = [x.model for x in m.models or []]
    echo(f"{path}: valid")
    echo(f"merge: {m.merge_method} of {', '.join(models)} over {m.base_model or '(no base)'}")
    echo(f"layers: {layers if layers is not None else 'unknown offline'}")
    for line in _memory_lines(space, recipe.device):
        echo(line)
    echo(f"space: {len(space)} genes")
    shown = space.genes if len(space) <= MAX_GENES_LISTED else space.genes[:MAX_GENES_LISTED]
    width = max(len(g.name) for g in shown)
    echo(f"  {'gene':<{width}}  {'low':>6} {'high':>6} {'init':>6} {'sigma':>7}")
    for g in shown:
        echo(f"  {g.name:<{width}}  {g.low:>6g} {g.high:>6g} {g.init:>6g} {g.sigma:>7.4g}")
    if len(shown) < len(space):
        kinds = ", ".join(f"{n} {k}" for k, n in Counter(g.param for g in space.genes).items())
        echo(f"  ... {len(space) - len(shown)} more ({kinds} in all)")
    opt = recipe.optimizer
    population = opt.population or default_population(len(space))
    evaluations = recipe.budget.evaluations
    line = f"optimizer: {opt.backend} {opt.name}, population {population}"
    if evaluations:
        full, rest = divmod(evaluations, population)
        line += f", {full + bool(rest)} generations"
        if rest:
            line += f" (the last of {rest})"
    echo(line)
    budget = []
    if evaluations:
        budget.append(f"{evaluations} evaluations")
    if recipe.budget.seconds:
        budget.append(f"at most {recipe.budget.seconds / 3600:g} h of wall clock")
    echo(f"budget: {' and '.join(budget)}")
    listed = [
        p.name + (f" ({len(p.recipes)} evaluations)" if p.kind == "grid" else "") for p in planned
    ]
    if baselines.wants_random(recipe):
        listed.append(f"random search ({evaluations or 'as many'} evaluations)")
    echo(f"baselines: sources, uniform merge{''.join('; ' + b for b in listed)}")
    loads = {split: _workload(spec, split, manager) for split in ("fitness", "heldout")}
    for split in ("fitness", "heldout"):
        entries = ", ".join(_entry_text(e) for e in spec.entries(split)) or "none"
        echo(f"{split}: {entries}")
    random = (evaluations or 0) if baselines.wants_random(recipe) else 0
    grid = sum(len(p.recipes) for p in planned if p.kind == "grid")
    for line in _cost_lines(recipe, loads, len(planned) + bool(random), grid + random):
        echo(line)
    echo("nothing was downloaded or loaded")


def _memory_lines(space, device: str) -> list[str]:
    """The memory plan of a parameter-space search whose sources are all local folders (read
    from their headers; a Hub model or an unconverted GGUF file is not fetched for it), for the
    recipe's device (`auto`: a GPU if this machine has one)."""
    import torch

    from evomerge.merge.lora import split_lora
    from evomerge.merge.materialize import output_config
    from evomerge.merge.memory import plan_memory
    from evomerge.merge.plan import build_plan
    from evomerge.merge.refs import ModelRef
    from evomerge.search.space import ParameterSpace

    if not isinstance(space, ParameterSpace):
        return []
    first = space.to_recipe(space.init())
    models = first.referenced_models()
    if not all(Path(ModelRef.parse(split_lora(m)[0]).path).is_dir() for m in models):
        return ["memory plan: needs every source on this machine (a Hub model or GGUF is not "
                "fetched for a dry run)"]  # fmt: skip
    plan = build_plan(first)
    try:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return plan_memory(plan, output_config(plan), device=device.split(":")[0]).lines()
    finally:
        for ckpt in plan.checkpoints.values():
            ckpt.close()


def _entry_text(entry) -> str:
    rows = f" rows {entry.rows[0]}:{entry.rows[1]}" if entry.rows else ""
    return f"{entry.task}{rows} ({entry.metric})"


def _check_entry(entry, index_entry, split: str) -> None:
    """What `prepare_suites` would reject, checked from the task's YAML (no dataset needed):
    a group or tag as an entry, a metric or filter the task does not produce."""
    from lm_eval.tasks._index import Kind

    where = f"fitness spec ({split}): task {entry.task}"
    if index_entry.kind not in (Kind.TASK, Kind.PY_TASK):
        raise SearchError(
            f"{where} is a {index_entry.kind.name.lower()} of several tasks; a fitness entry "
            "scores one task: list its tasks one by one"
        )
    cfg = index_entry.cfg or {}
    metric, _, filter_name = entry.metric.partition(",")
    metrics = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
    if metrics and all(isinstance(m, str) for m in metrics) and metric not in metrics:
        raise SearchError(
            f"{where} does not produce metric {metric!r}; it produces {', '.join(metrics)}"
        )
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)]
    filters = [f for f in filters if isinstance(f, str)] or ["none"]
    if filter_name and filter_name not in filters:
        raise SearchError(
            f"{where} has no filter {filter_name!r}; its filters: {', '.join(filters)}"
        )
    if not filter_name and len(filters) > 1:
        raise SearchError(
            f"{where} reports {metric} under filters {', '.join(filters)}: name one, "
            f"e.g. metric: {metric},{filters[0]}"
        )


@dataclass(frozen=True)
class _Load:
    """One task's share of a split's scoring: documents and generated tokens per document."""

    task: str
    docs: int | None  # None: known only once the dataset is loaded (no rows: or limit:)
    max_gen_toks: int | None  # None: scored by log-likelihood, nothing generated


def _workload(spec, split: str, manager) -> list[_Load]:
    """Per task of a split: documents (from rows and limit, as the suite picks them) and the
    most tokens generated per document (the spec's generation budget, else the task's)."""
    loads = []
    for entry in spec.entries(split):
        if entry.rows is not None:
            docs: int | None = entry.rows[1] - entry.rows[0]
            if isinstance(spec.limit, float):
                docs = math.ceil(docs * spec.limit)
            elif isinstance(spec.limit, int):
                docs = min(docs, spec.limit)
        elif isinstance(spec.limit, int):
            docs = spec.limit  # at most: the split may hold fewer
        else:
            docs = None
        cfg = getattr(manager.task_index.get(entry.task), "cfg", None) or {}
        gen = None
        if cfg.get("output_type", "generate_until") == "generate_until":
            gen = spec.generation.max_gen_toks or (cfg.get("generation_kwargs") or {}).get(
                "max_gen_toks", DEFAULT_MAX_GEN_TOKS
            )
        loads.append(_Load(entry.task, docs, None if gen is None else int(gen)))
    return loads


def _cost_lines(
    recipe: SearchRecipe, loads: dict[str, list[_Load]], baselines: int, baseline_evaluations: int
) -> list[str]:
    """The workload of one evaluation, of the search, of its `baselines` (models scored at
    the end, after `baseline_evaluations` fitness evaluations choosing them), and of the final
    scoring, with what the estimate assumes."""
    evaluations = recipe.budget.evaluations
    fitness = loads["fitness"]
    unknown = [load.task for load in fitness if load.docs is None]
    if unknown:
        return [
            f"cost: unknown: the size of {', '.join(unknown)} is known only once its dataset "
            "is loaded; give it rows: START:END (or the spec a limit:) to estimate"
        ]
    docs = sum(load.docs or 0 for load in fitness)
    tokens = sum((load.docs or 0) * (load.max_gen_toks or 0) for load in fitness)
    parts = [
        f"{load.task} {load.docs:,}"
        + (
            f", up to {load.max_gen_toks:,} generated tokens each"
            if load.max_gen_toks
            else ", log-likelihood"
        )
        for load in fitness
    ]
    line = f"cost: one evaluation = {docs:,} documents ({'; '.join(parts)})"
    if tokens == 0:
        return [line, "cost: no time estimate: log-likelihood scoring is not modelled"]
    lines = [f"{line} = at most {_count(tokens)} generated tokens"]
    if not evaluations:
        lines.append("cost: the number of evaluations is unknown (a wall-clock budget only)")
        return lines
    lines.append(
        f"cost: {evaluations} evaluations = at most {_count(evaluations * tokens)} generated "
        f"tokens, about {_hours(evaluations * tokens)} GPU-hours"
    )
    mode = recipe.fitness.mode
    if mode.type != "full":
        from evomerge.search.fitness import planned_rows

        population = recipe.optimizer.population or default_population(len(make_space(recipe)))
        rows = planned_rows(mode, evaluations, population, docs, recipe.fitness.rescore)
        share = rows / (evaluations * docs)
        bound = "at most " if mode.type == "racing" else ""
        lines.append(
            f"cost: fitness mode {mode.type}: {bound}{rows:,} of those {evaluations * docs:,} "
            f"documents ({share:.1%}, re-scoring included), about "
            f"{_hours(round(share * evaluations * tokens))} GPU-hours"
        )
    if baseline_evaluations:
        lines.append(
            f"cost: the baselines evaluate {baseline_evaluations} candidates more: at most "
            f"{_count(baseline_evaluations * tokens)} generated tokens, about "
            f"{_hours(baseline_evaluations * tokens)} GPU-hours"
        )
    sources = len(recipe.merge.referenced_models())
    references = sources + 2 + baselines  # the sources, uniform, baselines and best
    heldout = loads["heldout"]
    held_unknown = [load.task for load in heldout if load.docs is None]
    final = tokens + sum((load.docs or 0) * (load.max_gen_toks or 0) for load in heldout)
    line = (
        f"cost: then {references} models ({sources} sources, the uniform merge, {baselines} "
        f"baselines and the best merge) are scored on both splits: at most "
        f"{_count(references * final)} tokens more, about {_hours(references * final)} GPU-hours"
    )
    if held_unknown:
        line += f", plus {', '.join(held_unknown)} (its size is unknown until loaded)"
    lines.append(line)
    lines.append(
        f"assumed: {TOKENS_PER_SECOND_7B:,.0f} generated tokens/s (a 7B model, HF "
        "transformers, greedy, batch 32, one H100) and every answer running to its "
        "max_gen_toks (an upper bound: most stop earlier); prompts, merging and "
        "log-likelihood tasks not counted; measure yours with `evomerge eval`"
    )
    return lines


def _count(tokens: int) -> str:
    if tokens >= 10**9:
        return f"{tokens / 1e9:,.2f}B"
    if tokens >= 10**6:
        return f"{tokens / 1e6:,.1f}M"
    return f"{tokens:,}"


def _hours(tokens: int) -> str:
    hours = tokens / TOKENS_PER_SECOND_7B / 3600
    return f"{hours:,.0f}" if hours >= 10 else f"{hours:.1f}"
