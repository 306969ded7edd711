"""How much of the fitness set a candidate is scored on: the `mode:` of a fitness spec.

    mode: full                                    # every row, every candidate (the default)
    mode: {type: racing, chunk: 50, z: 2.0}       # rows in chunks; stop a hopeless candidate
    mode: {type: minibatch, rows: 30}             # a fresh seeded subset per generation
    mode: {type: irt, anchors: 30}                # anchor rows and an IRT estimate
    rescore: 3                                    # the best few re-scored on every row

Whatever the mode, `rescore` candidates with the best estimates are scored on every fitness
row before the best is chosen, and the held-out split is always scored in full. The modes are
data; `evomerge.search.fitness` runs them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FullMode(_Strict):
    """Every candidate on every fitness row."""

    type: Literal["full"] = "full"


class RacingMode(_Strict):
    """Rows in chunks of `chunk` (the same seeded order for every candidate); a candidate
    stops once the upper confidence bound of its fitness, `z` standard errors above its
    estimate, falls below what it needs to matter. For a Nevergrad population that is the
    lower bound of the last parent of its generation (`parents`, default half the population,
    CMA-ES's choice); with the Optuna backend the study's pruner decides (`pruner`, an
    `optuna.pruners` class name, with `pruner_options`)."""

    type: Literal["racing"]
    chunk: int = Field(default=50, gt=0)
    z: float = Field(default=2.0, gt=0)
    parents: int | None = Field(default=None, gt=0)
    pruner: str = "MedianPruner"
    pruner_options: dict[str, Any] = {}


class MinibatchMode(_Strict):
    """Each generation scores a fresh subset of `rows` fitness rows, drawn from the search
    seed and the generation number, the same for every candidate of that generation (Sakana's
    DFS setting)."""

    type: Literal["minibatch"]
    rows: int = Field(gt=0)


class IrtMode(_Strict):
    """Item response theory, as tinyBenchmarks and MERGE3: the source models and the first
    `calibrate` generations are scored on every row; a `dims`-dimensional 2PL model is fitted
    to their per-row correctness; `anchors` rows are chosen by clustering the rows' fitted
    parameters; every later candidate is scored on the anchors only and its full-set score
    estimated from them, with a standard error."""

    type: Literal["irt"]
    anchors: int = Field(default=30, gt=1)
    dims: int = Field(default=2, gt=0)
    calibrate: int = Field(default=1, ge=0)


def _shorthand(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


FitnessMode = Annotated[
    FullMode | RacingMode | MinibatchMode | IrtMode,
    BeforeValidator(_shorthand),
    Field(discriminator="type"),
]
MODE_NAMES = ("full", "racing", "minibatch", "irt")
