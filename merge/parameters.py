"""Resolving a parameter for one tensor: precedence, name filters and per-layer gradients.

Precedence (highest first): the source's parameters, the output slice's, the recipe's.
A list of numbers is a gradient: layer i of an n-layer output slice reads it interpolated at
t = i / (n - 1) (t = 1 for a one-layer slice); embeddings, final norm and lm_head read t = 0.
A list of `{filter, value}` entries picks the first whose filter is a substring of the
tensor name (an entry without filter matches everything).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from evomerge.merge.errors import MergeError
from evomerge.merge.methods import MergeMethod, ParamSpec, Scope
from evomerge.merge.recipe import ConditionalSetting, Parameters, Setting


def evaluate_setting(tensor_name: str, setting: Setting, t: float, spec: ParamSpec) -> Any:
    if isinstance(setting, ConditionalSetting):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return spec.validate(setting)
    if not setting:
        return None
    if all(not isinstance(e, ConditionalSetting) for e in setting):
        values = [spec.validate(e) for e in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return spec.validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if (
            cond.filter is None
            or cond.filter == "*"
            or (tensor_name and cond.filter in tensor_name)
        ):
            return evaluate_setting(tensor_name, cond.value, t, spec)
    return None


def resolve(
    spec: ParamSpec, scopes: Iterable[Parameters | None], tensor_name: str, t: float, where: str
) -> Any:
    for scope in scopes:
        if scope is not None and spec.name in scope:
            value = evaluate_setting(tensor_name, scope[spec.name], t, spec)
            if value is not None:
                return value
    if spec.required:
        raise MergeError(
            f"{where}: parameter {spec.name!r} is required (for {tensor_name}); set it on this "
            "model or in the recipe's top-level parameters"
        )
    return spec.validate(spec.default)


def resolve_tensor_parameters(
    method: MergeMethod,
    *,
    out_name: str,
    input_names: list[str],
    input_models: list[str],
    base_index: int | None,
    source_scopes: list[list[Parameters | None]],
    slice_scope: Parameters | None,
    top_scope: Parameters | None,
    t: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shared parameters and one dict per input (the base gets INPUT-scope ones only)."""
    shared = {
        p.name: resolve(p, (slice_scope, top_scope), out_name, t, "parameters")
        for p in method.shared_params
    }
    per_input = []
    for i, (name, model) in enumerate(zip(input_names, input_models, strict=True)):
        scopes = (*source_scopes[i], slice_scope, top_scope)
        per_input.append(
            {
                p.name: resolve(p, scopes, name, t, model)
                for p in method.input_params
                if i != base_index or p.scope == Scope.INPUT
            }
        )
    return shared, per_input


def check_parameter_names(method: MergeMethod, scope: Parameters | None, where: str) -> None:
    """Unknown parameter names are errors: a typo must not silently fall back to a default."""
    for name, setting in (scope or {}).items():
        spec = method.param(name)
        if spec is None:
            accepted = ", ".join(p.name for p in method.params) or "none"
            raise MergeError(
                f"{where}.parameters.{name}: not a parameter of {method.name} "
                f"(accepted: {accepted})"
            )
        for value in _leaves(setting):
            try:
                spec.validate(value)
            except MergeError as exc:
                raise MergeError(f"{where}.parameters.{name}: {exc}") from None


def _leaves(setting: Setting) -> list[Any]:
    if isinstance(setting, ConditionalSetting):
        return _leaves(setting.value)
    if isinstance(setting, list):
        return [leaf for item in setting for leaf in _leaves(item)]
    return [setting]
