"""Merge methods by name, with mergekit's parameter names, defaults and input rules.

Each method is a pure function of one output tensor's inputs (`TensorGroup`) and its resolved
parameters; the file merge and the in-memory merge both call these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from evomerge.merge.errors import MergeError


class Scope(StrEnum):
    SHARED = "shared"  # one value per output tensor
    INPUT = "input"  # one value per input model, the base included
    NON_BASE = "non_base"  # one value per input model other than the base


REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: type
    scope: Scope
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any) -> Any:
        try:
            return TypeAdapter(self.type).validate_python(value)
        except ValidationError:
            raise MergeError(
                f"{value!r} is not a valid {getattr(self.type, '__name__', self.type)}"
            ) from None


class BasePolicy(StrEnum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    IGNORED = "ignored"


@dataclass(frozen=True)
class TensorGroup:
    """The inputs of one output tensor, in recipe order, already in a common dtype."""

    tensors: list[torch.Tensor]
    base_index: int | None
    name: str

    @property
    def base(self) -> torch.Tensor:
        assert self.base_index is not None
        return self.tensors[self.base_index]

    @property
    def non_base(self) -> list[torch.Tensor]:
        return [t for i, t in enumerate(self.tensors) if i != self.base_index]


Generators = Callable[[int], torch.Generator]
"""Returns the random generator for the i-th non-base input of the current tensor."""

MergeFn = Callable[
    [TensorGroup, dict[str, Any], list[dict[str, Any]], Generators | None], torch.Tensor
]
MergeIntoFn = Callable[
    [TensorGroup, dict[str, Any], list[dict[str, Any]], Generators | None, torch.Tensor],
    torch.Tensor,
]
"""`merge` writing into a given contiguous tensor of the inputs' dtype (the in-memory merger's
model parameter), sparing a full-size result and its copy."""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    params: tuple[ParamSpec, ...]
    merge: MergeFn
    merge_into: MergeIntoFn | None = None
    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    stochastic: bool = False
    description: str = ""
    reference: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def shared_params(self) -> list[ParamSpec]:
        return [p for p in self.params if p.scope == Scope.SHARED]

    @property
    def input_params(self) -> list[ParamSpec]:
        return [p for p in self.params if p.scope != Scope.SHARED]

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def check_inputs(self, models: list[str], base: str | None, where: str) -> None:
        """Structural checks, before any tensor is read."""
        repeated = next((m for i, m in enumerate(models) if m in models[:i]), None)
        if repeated is not None:
            raise MergeError(
                f"{where}: {repeated} is listed twice; list each model once (mergekit refuses "
                "duplicate inputs too)"
            )
        has_base = base is not None and base in models
        if self.base == BasePolicy.REQUIRED and not has_base:
            if base is None:
                raise MergeError(f"{where}: merge_method {self.name} needs a base_model")
            raise MergeError(f"{where}: base_model {base} is not among the inputs of {self.name}")
        n_inputs = len(models)
        n_non_base = n_inputs - int(has_base and self.base != BasePolicy.IGNORED)
        limits = [
            ("inputs", n_inputs, self.min_inputs, self.max_inputs),
            ("models besides the base", n_non_base, self.min_non_base, self.max_non_base),
        ]
        for what, count, low, high in limits:
            if low is not None and count < low:
                raise MergeError(f"{where}: {self.name} needs at least {low} {what}, got {count}")
            if high is not None and count > high:
                raise MergeError(f"{where}: {self.name} takes at most {high} {what}, got {count}")


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise MergeError(f"merge_method: unknown method {name!r}; use one of {known}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


# Registration happens on import of the modules below.
from evomerge.merge.methods import (  # noqa: E402, F401
    chunks,
    consensus,
    linear,
    model_stock,
    passthrough,
    selective,
    spherical,
    task_arithmetic,
)
