"""The layer conventions merges share: which tensor names belong to a numbered decoder layer
(`{prefix}.{i}.{rest}`), and a config whose layer count and per-layer types follow a new list
of source layers (a frankenmerge, a data-flow path)."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

_LAYER = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(prefix, index, rest) of a tensor in a numbered block, e.g. `model.layers`, 3,
    `mlp.up_proj.weight`; None for the others (embeddings, final norm, lm_head)."""
    match = _LAYER.match(name)
    return (match["prefix"], int(match["index"]), match["rest"]) if match else None


def _types(config: Any) -> list[str] | None:
    if isinstance(config, dict):
        text = config.get("text_config") or config
        return text.get("layer_types")
    return getattr(config, "layer_types", None)


def layer_types(layers: Sequence[tuple[str, int]], configs: Mapping[str, Any]) -> list[str] | None:
    """Each output layer keeps its source layer's type (`layer_types`, e.g. sliding or full
    attention); None when no source config has them. `configs` may be dicts or config objects."""
    sources = {ref: _types(config) for ref, config in configs.items()}
    if all(types is None for types in sources.values()):
        return None
    return [sources[model][index] for model, index in layers]  # type: ignore[index]


def layered_config(
    config: dict[str, Any], layers: Sequence[tuple[str, int]], configs: Mapping[str, Any]
) -> dict[str, Any]:
    """A copy of config.json data whose num_hidden_layers (and layer_types) follow `layers`,
    the (model, source layer) of each output layer."""
    out = copy.deepcopy(config)
    text = out.get("text_config") or out
    text["num_hidden_layers"] = len(layers)
    if "layer_types" in text:
        text["layer_types"] = layer_types(layers, configs)
    return out
