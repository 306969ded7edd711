"""`evomerge eval`: score a checkpoint folder or a recipe merged in memory, print a table, write
JSON. Tasks are loaded before the model, so task problems surface before any weights are read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from evomerge.evals.catalog import TaskCatalog
from evomerge.evals.errors import EvalError
from evomerge.evals.evaluator import Evaluator
from evomerge.evals.models import load_candidate
from evomerge.evals.results import EvalResult
from evomerge.evals.spec import EvalSettings, FitnessSpec, load_fitness_spec
from evomerge.evals.suite import TaskSuite, prepare_suites, suite_from_names
from evomerge.merge.recipe import describe_validation_error
from evomerge.merge.staging import check_can_create, write_text

T = TypeVar("T", bound=BaseModel)

# lm-eval's default, so `evomerge eval` reports the standard errors `lm-eval run` reports.
CLI_BOOTSTRAP_ITERS = 100_000


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise EvalError(f"--batch-size: {text!r} is not a positive integer or 'auto'")


def parse_limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if value <= 0:
        raise EvalError(f"--limit: {value:g} must be positive (a count, or a fraction below 1)")
    if value >= 1 and value != int(value):
        raise EvalError(f"--limit: {value:g} is neither a whole count nor a fraction below 1")
    return int(value) if value >= 1 else value


def _validated(model: type[T], data: dict[str, Any]) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EvalError(f"command line: {describe_validation_error(exc)}") from None


def prepare(
    *,
    tasks: str | None,
    fitness: Path | None,
    split: str,
    include_path: Sequence[Path],
    overrides: dict[str, Any],
    max_gen_toks: int | None,
) -> dict[str, TaskSuite]:
    """The suites to run, from --tasks or from a fitness spec with command-line overrides."""
    if (tasks is None) == (fitness is None):
        raise EvalError("give exactly one of --tasks NAME[,NAME...] or --fitness SPEC.yaml")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if tasks is not None:
        names = [name.strip() for name in tasks.split(",") if name.strip()]
        if not names:
            raise EvalError("--tasks: no task names given")
        if max_gen_toks is not None:
            overrides["generation"] = {"max_gen_toks": max_gen_toks}
        settings = _validated(EvalSettings, {"bootstrap_iters": CLI_BOOTSTRAP_ITERS, **overrides})
        return {"tasks": suite_from_names(TaskCatalog(include_path), names, settings)}
    spec = load_fitness_spec(fitness)
    if max_gen_toks is not None:
        overrides["generation"] = {**dict(spec.generation), "max_gen_toks": max_gen_toks}
    include = [*spec.include_path, *map(Path, include_path)]
    spec = _validated(FitnessSpec, {**dict(spec), **overrides, "include_path": include})
    suites = prepare_suites(spec)
    if split != "both":
        if split not in suites:
            raise EvalError(f"--split {split}: the fitness spec has no {split} tasks")
        suites = {split: suites[split]}
    return suites


def run_eval(
    source: Path,
    *,
    tasks: str | None = None,
    fitness: Path | None = None,
    split: str = "both",
    include_path: Sequence[Path] = (),
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    apply_chat_template: bool = False,
    max_gen_toks: int | None = None,
    bootstrap_iters: int | None = None,
    output: Path | None = None,
    log_samples: bool = False,
    allow_pickle: bool = False,
    echo=print,
) -> dict[str, EvalResult]:
    if split not in ("fitness", "heldout", "both"):
        raise EvalError(f"--split: {split!r} is not one of fitness, heldout, both")
    name = source.stem if source.is_file() else source.name
    output = output or Path("runs") / f"eval-{name}.json"
    check_can_create(output, EvalError)
    overrides: dict[str, Any] = {
        "limit": parse_limit(limit),
        "num_fewshot": num_fewshot,
        "batch_size": None if batch_size is None else parse_batch_size(batch_size),
        "apply_chat_template": apply_chat_template or None,
        "bootstrap_iters": bootstrap_iters,
    }
    suites = prepare(
        tasks=tasks,
        fitness=fitness,
        split=split,
        include_path=include_path,
        overrides=overrides,
        max_gen_toks=max_gen_toks,
    )
    candidate = load_candidate(source, device=device, dtype=dtype, allow_pickle=allow_pickle)
    evaluator = Evaluator(
        candidate.model, candidate.tokenizer, suites, quiet=False, log_samples=log_samples
    )
    results = {name: evaluator.score(name) for name in suites}
    for name, result in results.items():
        echo(f"\n{name}: {candidate.source}, {result.seconds:.1f} s")
        echo(result.table())
    data = {
        "model": candidate.source,
        **{name: r.to_dict(with_samples=log_samples) for name, r in results.items()},
    }
    write_text(output, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    echo(f"\nwrote {output}")
    return results
