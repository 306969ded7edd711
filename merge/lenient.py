"""What mergekit 0.1.5 accepts in a recipe and evomerge's schema does not name: unknown keys
(`name:` from mergekit-multi files, a typo such as `dype:`) and parameters the method does not
take (`weight` on model_stock). mergekit ignores both silently; here each is dropped with a
one-line warning naming it and the closest valid name (an ignored `dype` means a float32
merge), and `strict` makes the first of them an error instead.

Also unwraps mergekit's one-module form, `modules: {default: {slices: ...}}` (what mergekit's
Python API saves as `mergekit_config.yml`).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from typing import Any

from evomerge.merge.errors import MergeError

Warn = Callable[[str], None]


def accept_mergekit_recipe(data: dict[str, Any], origin: str, strict: bool, warn: Warn) -> dict:
    """`data` without what mergekit would ignore (each reported through `warn`, or the first
    raised as a MergeError with `strict`), and with a one-module `modules:` unwrapped."""
    from evomerge.merge.recipe import InputModel, Recipe, TokenizerConfig

    data = _unwrap_modules(copy.deepcopy(data), origin)  # the caller's data is never modified
    ignored: list[str] = []
    out = _known(data, set(Recipe.model_fields), "", ignored)
    if isinstance(out.get("models"), list):
        keys = set(InputModel.model_fields)
        out["models"] = [
            _known(m, keys, f"models[{i}].", ignored) for i, m in enumerate(out["models"])
        ]
    if isinstance(out.get("slices"), list):
        out["slices"] = [_slice(s, i, ignored) for i, s in enumerate(out["slices"])]
    if isinstance(out.get("tokenizer"), dict):
        keys = set(TokenizerConfig.model_fields)
        out["tokenizer"] = _known(out["tokenizer"], keys, "tokenizer.", ignored)
    _drop_unknown_parameters(out, ignored)
    for message in ignored:
        if strict:
            raise MergeError(f"{origin}: {message}; remove it (--strict)")
        warn(f"{origin}: {message}; mergekit ignores it, and so does evomerge (--strict: error)")
    return out


def _unwrap_modules(data: dict[str, Any], origin: str) -> dict[str, Any]:
    modules = data.get("modules")
    if modules is None:
        return data
    if not isinstance(modules, dict) or len(modules) != 1:
        count = len(modules) if isinstance(modules, dict) else "not a mapping of"
        raise MergeError(
            f"{origin}: modules: {count} modules; only a single-module recipe is supported "
            "(write its models or slices at the top level)"
        )
    ((_, module),) = modules.items()
    if not isinstance(module, dict):
        raise MergeError(f"{origin}: modules: a module must be a mapping with models or slices")
    module = dict(module)
    out = {key: value for key, value in data.items() if key != "modules"}
    if "parameters" in module:  # the module's parameters are the more specific ones
        out["parameters"] = {**(out.get("parameters") or {}), **module.pop("parameters")}
    return out | module


def _slice(data: Any, index: int, ignored: list[str]) -> Any:
    from evomerge.merge.recipe import OutputSlice, SourceSlice

    out = _known(data, set(OutputSlice.model_fields), f"slices[{index}].", ignored)
    if isinstance(out, dict) and isinstance(out.get("sources"), list):
        keys, where = set(SourceSlice.model_fields), f"slices[{index}].sources"
        out["sources"] = [
            _known(s, keys, f"{where}[{j}].", ignored) for j, s in enumerate(out["sources"])
        ]
    return out


def _known(data: Any, keys: set[str], where: str, ignored: list[str]) -> Any:
    if not isinstance(data, dict):
        return data  # the schema reports what is wrong with it
    for key in data:
        if key not in keys:
            ignored.append(f"{where}{key}: not a recipe key{_closest(str(key), keys)}")
    return {key: value for key, value in data.items() if key in keys}


def _drop_unknown_parameters(data: dict[str, Any], ignored: list[str]) -> None:
    from evomerge.merge.methods import get_method, method_names

    method = data.get("merge_method")
    if not isinstance(method, str) or method not in method_names():
        return  # the schema or the planner names the method problem
    names = {p.name for p in get_method(method).params}
    holders: list[tuple[str, Any]] = [("", data)]
    holders += [(f"models[{i}].", m) for i, m in enumerate(_list(data.get("models")))]
    for i, out_slice in enumerate(_list(data.get("slices"))):
        holders.append((f"slices[{i}].", out_slice))
        if isinstance(out_slice, dict):
            sources = _list(out_slice.get("sources"))
            holders += [(f"slices[{i}].sources[{j}].", src) for j, src in enumerate(sources)]
    for where, holder in holders:
        params = holder.get("parameters") if isinstance(holder, dict) else None
        if not isinstance(params, dict):
            continue
        for key in [k for k in params if k not in names]:
            closest = _closest(str(key), names)
            ignored.append(f"{where}parameters.{key}: {method} takes no such parameter{closest}")
            del params[key]
        if not params:
            del holder["parameters"]


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []  # anything else: the schema's to report


def _closest(key: str, valid: set[str]) -> str:
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""
