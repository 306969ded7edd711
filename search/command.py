"""`evomerge search RECIPE [--out DIR] [--resume] [--dry-run]`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evomerge.search.config import SearchRecipe, load_search_recipe
from evomerge.search.errors import SearchError
from evomerge.search.loop import Search
from evomerge.search.optimizers import default_population

# Generation throughput assumed by --dry-run for a 7B model (HF transformers, greedy, batch 32,
# one H100); it scales inversely with the parameter count. Measure yours with `evomerge eval`.
TOKENS_PER_SECOND_7B = 1500.0


def run_search_command(
    recipe_path: Path,
    *,
    out: Path | None,
    resume: bool,
    dry_run: bool,
    device: str | None,
    storage: str | None,
    echo: Callable[[str], None],
    progress: bool = True,
) -> None:
    recipe = load_search_recipe(recipe_path)
    if device is not None:
        recipe = recipe.model_copy(update={"device": device})
    out = out or recipe.out or Path("runs") / recipe_path.stem
    if dry_run:
        describe(recipe, recipe_path, echo)
        return
    search = Search.prepare(recipe, out, storage=storage, title=recipe_path.stem)
    try:
        search.run(resume=resume, echo=echo, progress=progress)
    except SearchError:
        raise
    except KeyboardInterrupt:
        echo(f"interrupted; every finished trial is in {search.storage}: --resume continues")
        raise


def describe(recipe: SearchRecipe, path: Path, echo: Callable[[str], None]) -> None:
    """Validate the recipe and print the space, the budget and a cost estimate, offline."""
    from evomerge.evals.catalog import TaskCatalog
    from evomerge.search.loop import ensure_demo_family, num_layers
    from evomerge.search.optimizers import check_optimizer
    from evomerge.search.space import ParameterSpace

    check_optimizer(recipe.optimizer)
    if recipe.demo_family is not None:
        ensure_demo_family(recipe.demo_family)
    layers = num_layers(recipe)
    space = ParameterSpace(recipe.merge, recipe.space, layers)
    spec = recipe.fitness
    catalog = TaskCatalog(spec.include_path)
    names = [e.task for split in ("fitness", "heldout") for e in spec.entries(split)]
    catalog.check(names)
    m = recipe.merge
    models = [x.model for x in m.models or []]
    echo(f"{path}: valid")
    echo(f"merge: {m.merge_method} of {', '.join(models)} over {m.base_model or '(no base)'}")
    echo(f"layers: {layers if layers is not None else 'unknown offline'}")
    echo(f"space: {len(space)} genes")
    width = max(len(g.name) for g in space.genes)
    echo(f"  {'gene':<{width}}  {'low':>6} {'high':>6} {'init':>6} {'sigma':>7}")
    for g in space.genes:
        echo(f"  {g.name:<{width}}  {g.low:>6g} {g.high:>6g} {g.init:>6g} {g.sigma:>7.4g}")
    opt = recipe.optimizer
    population = opt.population or default_population(len(space))
    evaluations = recipe.budget.evaluations
    line = f"optimizer: {opt.backend} {opt.name}, population {population}"
    if evaluations:
        line += f", {-(-evaluations // population)} generations"
    echo(line)
    budget = []
    if evaluations:
        budget.append(f"{evaluations} evaluations")
    if recipe.budget.seconds:
        budget.append(f"at most {recipe.budget.seconds / 3600:g} h of wall clock")
    echo(f"budget: {' and '.join(budget)}")
    docs, tokens = _workload(recipe, catalog)
    for split in ("fitness", "heldout"):
        entries = ", ".join(_entry_text(e) for e in spec.entries(split)) or "none"
        echo(f"{split}: {entries}")
    if docs is None or not evaluations:
        echo("cost: unknown until the tasks are loaded (give rows: or limit: to estimate)")
    else:
        total = evaluations * tokens
        hours = total / TOKENS_PER_SECOND_7B / 3600
        echo(
            f"cost: {docs} documents and up to {tokens:,} generated tokens per evaluation; "
            f"{evaluations} evaluations = {total / 1e6:,.0f}M tokens, about {hours:,.0f} GPU-hours "
            f"at {TOKENS_PER_SECOND_7B:,.0f} tokens/s (a 7B model on one H100; measure yours "
            "with `evomerge eval`)"
        )
    echo("nothing was downloaded or loaded")


def _entry_text(entry) -> str:
    rows = f" rows {entry.rows[0]}:{entry.rows[1]}" if entry.rows else ""
    return f"{entry.task}{rows} ({entry.metric})"


def _workload(recipe: SearchRecipe, catalog) -> tuple[int | None, int]:
    """Documents and generated tokens per fitness evaluation, from rows/limit and the task
    configs (None when a task's size is only known once its dataset is loaded)."""
    spec = recipe.fitness
    docs_total, tokens = 0, 0
    manager = catalog.manager([e.task for e in spec.tasks])
    for entry in spec.tasks:
        if entry.rows is not None:
            docs = entry.rows[1] - entry.rows[0]
        elif isinstance(spec.limit, int):
            docs = spec.limit
        else:
            return None, 0
        cfg = getattr(manager.task_index.get(entry.task), "cfg", None) or {}
        gen = spec.generation.max_gen_toks or (cfg.get("generation_kwargs") or {}).get(
            "max_gen_toks", 256
        )
        docs_total += docs
        tokens += docs * int(gen)
    return docs_total, tokens
