"""The `evomerge` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from evomerge.merge.errors import MergeError

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
) -> None:
    """Merge the models of RECIPE into a checkpoint in OUT_DIR."""
    from evomerge.merge.materialize import run_merge
    from evomerge.merge.recipe import load_recipe

    parsed = load_recipe(recipe)
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
    typer.echo(f"wrote {out_dir}")


def with_origin(message: str, path: Path) -> str:
    """Prefix an error with the recipe file it came from, once."""
    return message if message.startswith(str(path)) else f"{path}: {message}"


def main() -> None:
    try:
        app()
    except MergeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
