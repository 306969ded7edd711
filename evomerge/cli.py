"""The `evomerge` command."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from evomerge.merge.errors import MergeError, allocation_failure_line, os_error_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find model merges by evolutionary search; make, score and publish them.",
)


@app.callback()
def _root() -> None:
    """evomerge: mergekit-compatible merges, searched with CMA-ES and scored with lm-eval."""


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="A mergekit-style YAML recipe.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged checkpoint.")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    seed: Annotated[int, typer.Option(help="Seed for stochastic methods (DARE, DELLA).")] = 0,
    allow_pickle: Annotated[
        bool, typer.Option(help="Also load pickled .bin weights (can run code: trusted only).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    strict: Annotated[
        bool, typer.Option(help="Refuse keys and parameters mergekit would ignore (warnings).")
    ] = False,
) -> None:
    """Merge the models of RECIPE into a checkpoint in OUT_DIR."""
    from evomerge.merge.materialize import run_merge
    from evomerge.merge.recipe import load_recipe

    parsed = load_recipe(recipe, strict=strict)
    try:
        run_merge(
            parsed,
            out_dir,
            device=device,
            out_shard_size=out_shard_size,
            seed=seed,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
        )
    except MergeError as exc:
        raise MergeError(with_origin(str(exc), recipe)) from None
    except KeyboardInterrupt:  # click would print "Aborted!"; the staged output is already gone
        typer.echo(f"interrupted; nothing was written to {out_dir}", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"wrote {out_dir}")


@app.command()
def search(
    recipe: Annotated[Path, typer.Argument(help="A search recipe (see recipes/demo.yaml).")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: the recipe's out, else runs/NAME).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the search recorded in the output folder's study.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Validate, print the space and a cost estimate; load nothing.")
    ] = False,
    allow_changed_sources: Annotated[
        bool, typer.Option(help="With --resume: go on although a source's files changed.")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the recipe's).")
    ] = None,
    storage: Annotated[
        str | None, typer.Option(help="An Optuna storage URL (default: SQLite in the output).")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Also load pickled .bin weights (can run code: trusted only).")
    ] = False,
    executor: Annotated[
        str | None, typer.Option(help="serial (default) or ray: candidates in parallel.")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="With --executor ray: a cluster address, e.g. auto.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="With --executor ray: workers (default: GPUs, else CPUs).")
    ] = None,
    sources: Annotated[
        str | None,
        typer.Option(help="Sources on the device, the host (streamed), or auto (the recipe's)."),
    ] = None,
) -> None:
    """Evolve the merge recipe RECIPE; write the best recipe, its model and a report."""
    _check_address_space("search")
    from evomerge.search.command import run_search_command

    try:
        run_search_command(
            recipe,
            out=out,
            resume=resume,
            dry_run=dry_run,
            allow_changed_sources=allow_changed_sources,
            device=device,
            storage=storage,
            allow_pickle=allow_pickle,
            executor=executor,
            ray_address=ray_address,
            workers=workers,
            sources=sources,
            echo=typer.echo,
        )
    except MergeError as exc:
        raise MergeError(with_origin(str(exc), recipe)) from None


@app.command()
def publish(
    folder: Annotated[
        Path, typer.Argument(help="A merge folder, or a search output folder holding model/.")
    ],
    repo: Annotated[str, typer.Option(help="The Hub repository, user/name.")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="List the files and card that would be uploaded; upload nothing.")
    ] = False,
    license: Annotated[
        str | None, typer.Option(help="The license id, when the sources' licenses disagree.")
    ] = None,
) -> None:
    """Check FOLDER, complete its model card and upload it to the Hugging Face Hub."""
    from evomerge.publish import publish as run_publish

    run_publish(folder, repo, private=private, dry_run=dry_run, license=license, echo=typer.echo)


@app.command()
def reproduce(
    source: Annotated[
        str, typer.Argument(help="A published merge: a Hub id (with @revision) or a folder.")
    ],
    out: Annotated[Path | None, typer.Option(help="Keep the rebuilt checkpoint here.")] = None,
    verify: Annotated[
        bool, typer.Option(help="Compare every tensor with the published weights.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    allow_pickle: Annotated[
        bool, typer.Option(help="Also load pickled .bin weights (can run code: trusted only).")
    ] = False,
) -> None:
    """Rebuild a published merge from its recipe; with --verify, check it tensor by tensor."""
    from evomerge.reproduce import reproduce as run_reproduce

    try:
        report = run_reproduce(
            source, out=out, verify=verify, device=device, allow_pickle=allow_pickle,
            echo=typer.echo,
        )  # fmt: skip
    except KeyboardInterrupt:  # the rebuild's staged or temporary folder is already gone
        where = f" to {out}" if out is not None else "; the temporary rebuild was removed"
        typer.echo(f"interrupted; nothing was written{where}", err=True)
        raise typer.Exit(130) from None
    if report is not None and not report.passed:
        raise typer.Exit(1)


def with_origin(message: str, path: Path) -> str:
    """Prefix an error with the recipe file it came from, once."""
    return message if message.startswith(str(path)) else f"{path}: {message}"


# Below this address space (ulimit -v) the libraries a search or an evaluation loads fail as they
# start, not with an error: OpenBLAS spins forever in its thread buffers at 2 GiB, torch aborts
# at 2.5 GiB, SQLite fails at 2.25 GiB (measured on the demo search; it ran at 2.86 GiB).
MIN_ADDRESS_SPACE = 3 * 2**30


def _check_address_space(command: str) -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        raise MergeError(
            f"{command}: the address-space limit (ulimit -v) is {soft / 2**30:.1f} GiB, below the "
            f"{MIN_ADDRESS_SPACE / 2**30:.0f} GiB torch and OpenBLAS need to start (they hang or "
            "abort under it); raise it, e.g. ulimit -v unlimited"
        )


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does: staged folders, locks, the study


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except MergeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    except OSError as exc:  # a full disk, a limit, a read-only output: staged writes are gone
        typer.echo(f"error: {os_error_line(exc)}", err=True)
        sys.exit(2)
    except MemoryError:
        typer.echo("error: out of memory; free memory, raise the limit (ulimit -v), or use a "
                   "smaller batch_size", err=True)  # fmt: skip
        sys.exit(2)
    except (RuntimeError, ImportError) as exc:  # host memory torch or a library could not map
        line = allocation_failure_line(exc)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(2)


@app.command("eval")
def eval_(
    model: Annotated[
        Path, typer.Argument(help="A model folder, or a merge recipe (merged in memory, no disk).")
    ],
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated lm-eval tasks, groups or tags.")
    ] = None,
    fitness: Annotated[
        Path | None, typer.Option(help="A fitness spec (or search recipe) instead of --tasks.")
    ] = None,
    split: Annotated[str, typer.Option(help="With --fitness: fitness, heldout or both.")] = "both",
    include_path: Annotated[
        list[Path] | None, typer.Option(help="A folder of task YAML files (repeatable).")
    ] = None,
    limit: Annotated[
        float | None, typer.Option(help="Documents per task (or a fraction below 1).")
    ] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples per prompt.")] = None,
    batch_size: Annotated[
        str | None, typer.Option(help="An integer, or auto (default: the spec's, else auto).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    apply_chat_template: Annotated[
        bool, typer.Option(help="Wrap prompts in the tokenizer's chat template.")
    ] = False,
    max_gen_toks: Annotated[
        int | None, typer.Option(help="Generation budget per answer (default: the task's).")
    ] = None,
    bootstrap_iters: Annotated[
        int | None, typer.Option(help="Bootstrap draws for non-mean metrics' stderr.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="JSON file for the results (default runs/eval-NAME.json).")
    ] = None,
    log_samples: Annotated[bool, typer.Option(help="Also write every document's output.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Also load pickled .bin weights (they can run code: trusted only).")
    ] = False,
) -> None:
    """Score MODEL with lm-eval tasks: print metrics with standard errors and write them as JSON."""
    _check_address_space("eval")
    from evomerge.evals.command import run_eval

    run_eval(
        model,
        tasks=tasks,
        fitness=fitness,
        split=split,
        include_path=include_path or [],
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        apply_chat_template=apply_chat_template,
        max_gen_toks=max_gen_toks,
        bootstrap_iters=bootstrap_iters,
        output=output,
        log_samples=log_samples,
        allow_pickle=allow_pickle,
        echo=typer.echo,
    )
