"""The fitness spec: which lm-eval tasks score a candidate, with which metric and weight, on which
rows, and the held-out task that judges the search on data it did not optimize.

It is the `fitness:` block of a search recipe, or a YAML file of its own:

    tasks:
      - {task: demo_skill_a, metric: exact_match, weight: 1, heldout: demo_skill_a_heldout}
      - task: gsm8k
        metric: exact_match,strict-match      # metric,filter when several filters produce it
        rows: 250:1318                        # Sakana's shape: optimize on rows 250-1317 ...
        heldout: {task: gsm8k, rows: 0:250}   # ... and judge on rows 0-249
    include_path: [my_tasks/]                 # task folders, relative to this file
    limit: 200
    generation: {max_gen_toks: 32}            # decoding is always greedy
    mode: {type: racing, chunk: 50}           # or minibatch / irt (see evomerge.evals.modes)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.evals.errors import EvalError
from evomerge.evals.modes import FitnessMode, FullMode
from evomerge.merge.recipe import describe_validation_error, parse_yaml, read_text

Split = Literal["fitness", "heldout"]


def _rows(value: Any) -> Any:
    """'250:1318' or [250, 1318] -> (250, 1318): rows start..end-1 of the task's eval split."""
    if isinstance(value, str):
        start, sep, end = value.partition(":")
        if not sep or not start.strip().isdigit() or not end.strip().isdigit():
            raise ValueError(f"{value!r} is not a row range; write START:END, e.g. 250:1318")
        value = (int(start), int(end))
    if isinstance(value, list | tuple) and len(value) == 2:
        start, end = value
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end:
            raise ValueError(f"{list(value)} must be [start, end) with 0 <= start < end")
        return (start, end)
    raise ValueError(f"{value!r} is not a row range; write START:END, e.g. 250:1318")


Rows = Annotated[tuple[int, int] | None, BeforeValidator(lambda v: None if v is None else _rows(v))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationBudget(_Strict):
    """What every generate_until task may spend; decoding is always greedy."""

    max_gen_toks: int | None = Field(default=None, gt=0)
    until: list[str] | None = None

    def gen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"do_sample": False, "temperature": 0.0}
        if self.max_gen_toks is not None:
            kwargs["max_gen_toks"] = self.max_gen_toks
        if self.until is not None:
            kwargs["until"] = list(self.until)
        return kwargs


class EvalSettings(_Strict):
    """How tasks are run, shared by `evomerge eval` and the fitness spec."""

    limit: int | float | None = Field(default=None, gt=0)
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int | Literal["auto"] = "auto"
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None
    generation: GenerationBudget = GenerationBudget()
    bootstrap_iters: int = Field(default=0, ge=0)
    fewshot_seed: int = 1234

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and value >= 1:
            raise ValueError("a fractional limit must be below 1; give a whole number of docs")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("batch_size must be a positive integer or 'auto'")
        return value

    @property
    def multiturn(self) -> bool:
        """lm-eval's default: few-shot examples become turns when a chat template is applied."""
        if self.fewshot_as_multiturn is None:
            return bool(self.apply_chat_template)
        return self.fewshot_as_multiturn


class HeldoutSpec(_Strict):
    task: str
    metric: str | None = None
    rows: Rows = None


class TaskSpec(_Strict):
    task: str
    metric: str
    weight: float = Field(default=1.0, gt=0)
    rows: Rows = None
    heldout: HeldoutSpec | None

    @model_validator(mode="before")
    @classmethod
    def _heldout_named(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "heldout" not in data:
                name = data.get("task", "TASK")
                raise ValueError(
                    f"{name} has no held-out task: add heldout: <a task the search does not "
                    f"optimize> (e.g. {name}_heldout), or heldout: null to opt out"
                )
            if isinstance(data["heldout"], str):
                data = {**data, "heldout": {"task": data["heldout"]}}
        return data

    def heldout_entry(self) -> TaskSpec | None:
        """The held-out split as an entry of its own (its metric defaults to this one's)."""
        if self.heldout is None:
            return None
        return TaskSpec(
            task=self.heldout.task,
            metric=self.heldout.metric or self.metric,
            weight=self.weight,
            rows=self.heldout.rows,
            heldout=None,
        )


def _overlaps(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return True
    return a[0] < b[1] and b[0] < a[1]


class FitnessSpec(EvalSettings):
    """Tasks with metric names and weights, scored into one number plus a per-task vector."""

    tasks: list[TaskSpec] = Field(min_length=1)
    include_path: list[Path] = []
    mode: FitnessMode = FullMode()
    rescore: int = Field(default=3, ge=0)  # best estimates re-scored on every row (not in full)

    @model_validator(mode="after")
    def _splits_disjoint(self) -> FitnessSpec:
        optimized = {entry.task for entry in self.tasks}
        for i, entry in enumerate(self.tasks):
            held = entry.heldout
            if held is None:
                continue
            if held.task == entry.task and _overlaps(entry.rows, held.rows):
                raise ValueError(
                    f"tasks.{i}: the held-out split of {entry.task} overlaps its fitness rows; "
                    "give both disjoint rows, e.g. rows: 250:1318 and heldout: {task: "
                    f"{entry.task}, rows: 0:250}}"
                )
            if held.task != entry.task and held.task in optimized:
                raise ValueError(
                    f"tasks.{i}: held-out task {held.task} is also optimized as a fitness task; "
                    "pick a held-out task the search never scores"
                )
        for split in ("fitness", "heldout"):
            rows_by_task: dict[str, tuple[int, int] | None] = {}
            for entry in self.entries(split):
                if rows_by_task.setdefault(entry.task, entry.rows) != entry.rows:
                    raise ValueError(
                        f"{entry.task} appears twice in the {split} split with different rows; "
                        "use one row range per task and split"
                    )
        return self

    def entries(self, split: Split) -> list[TaskSpec]:
        if split == "fitness":
            return list(self.tasks)
        return [held for entry in self.tasks if (held := entry.heldout_entry()) is not None]

    def settings(self) -> EvalSettings:
        return EvalSettings(**{name: getattr(self, name) for name in EvalSettings.model_fields})


def parse_fitness_spec(
    data: Any, origin: str = "fitness spec", base_dir: Path | None = None
) -> FitnessSpec:
    """A spec from parsed YAML; relative include paths are taken from `base_dir`."""
    if not isinstance(data, dict):
        raise EvalError(f"{origin}: expected a mapping with a 'tasks' list")
    try:
        spec = FitnessSpec.model_validate(data)
    except ValidationError as exc:
        raise EvalError(f"{origin}: {describe_validation_error(exc)}") from None
    if base_dir is not None:
        paths = [p if p.is_absolute() else base_dir / p for p in spec.include_path]
        spec = spec.model_copy(update={"include_path": paths})
    return spec


def load_fitness_spec(path: str | Path) -> FitnessSpec:
    """Read a fitness spec file, or the `fitness:` block of a search recipe."""
    path = Path(path)
    data = parse_yaml(read_text(path, "the fitness spec", EvalError), str(path), EvalError)
    if isinstance(data, dict) and "fitness" in data:
        return parse_fitness_spec(data["fitness"], f"{path}: fitness", path.parent)
    return parse_fitness_spec(data, str(path), path.parent)
