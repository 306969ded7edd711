"""Layer stacking along a data-flow path (the DFS of Akiba et al. 2024), in memory and on disk.

A path is a list of hops `Hop(model, layer, scale)`: the hidden state entering hop k is
multiplied by `scale` (s_k) and run through that model's decoder layer. The base model (the
first one unless named) supplies the embeddings, final norm, lm_head and tokenizer.

`StackedModel` runs a path in memory: its `.model` is a real `PreTrainedModel` of the base's
class whose decoder layers are `HopLayer`s wrapping the *shared* source layers (no weights are
copied, however often a layer repeats); `set_path` switches to the next candidate cheaply.

Export folds the scales into weights, so a plain checkpoint of the same architecture computes
the same function. For pre-norm residual blocks h_k = s_k h_{k-1} + f_k(s_k h_{k-1}) where f_k
reads its input only through RMSNorm, hence f_k(c x) = f_k(x) for c > 0 (up to the norm's eps).
With c_k = s_1 ... s_k and g_k = h_k / c_k: g_k = g_{k-1} + f_k(g_{k-1}) / c_k, applied to each
residual branch (attention, then MLP), i.e. layer k with `o_proj` and `down_proj` (weights and
biases) multiplied by 1 / c_k; the final RMSNorm removes the remaining factor c_L. The only
difference is eps: RMSNorm(c x) = x / sqrt(mean(x^2) + eps / c^2).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import pathlib
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from evomerge.merge.checkpoint import Checkpoint
from evomerge.merge.errors import MergeError
from evomerge.merge.layers import layer_of, layer_types, layered_config
from evomerge.merge.materialize import (
    TOKENIZER_FILES,
    check_finite,
    check_not_an_input,
    check_output_dir,
)
from evomerge.merge.refs import resolve_model_dir
from evomerge.merge.staging import staged_dir
from evomerge.merge.writer import Entry, ShardedWriter, parse_size

FOLDED = ("o_proj", "down_proj")
"""The residual-branch output projections that carry 1 / c_k in an export."""
_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
PATH_FILE = "evomerge_path.json"


@dataclass(frozen=True)
class Hop:
    """One step of a path: `model`'s decoder layer `layer`, its input multiplied by `scale`."""

    model: str
    layer: int
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.model}[{self.layer}]" + ("" if self.scale == 1.0 else f"*{self.scale:g}")


HopLike = Hop | tuple[str, int] | tuple[str, int, float]


def as_path(hops: Iterable[HopLike]) -> list[Hop]:
    """`[("A", 0), ("B", 3, 0.5), Hop("A", 1)]` -> a list of `Hop`s (not validated)."""
    return [h if isinstance(h, Hop) else Hop(*h) for h in hops]


def check_path(path: Iterable[HopLike], layer_counts: Mapping[str, int | None]) -> list[Hop]:
    """The path as `Hop`s of plain int and float (numpy numbers, as optimizers give them, are
    accepted); a one-line MergeError for an empty path, unknown model, layer out of range or a
    scale that is not a finite positive number. A layer count of None checks only the sign."""
    hops = as_path(path)
    if not hops:
        raise MergeError("stacking: a path with no layers; give at least one hop")
    for k, hop in enumerate(hops):
        where = f"stacking: hop {k} ({hop.model}, layer {hop.layer})"
        if hop.model not in layer_counts:
            known = ", ".join(layer_counts)
            raise MergeError(f"{where}: unknown model {hop.model!r} (known: {known})")
        n = layer_counts[hop.model]
        if not _is_a(hop.layer, numbers.Integral) or not 0 <= hop.layer < (
            math.inf if n is None else n
        ):
            valid = (
                f"which has {n} layers (valid: 0 to {n - 1})"
                if n is not None
                else "(valid: 0 or more)"
            )
            raise MergeError(
                f"{where}: layer index {hop.layer!r} is out of range for {hop.model}, {valid}"
            )
        if not _is_a(hop.scale, numbers.Real) or not (math.isfinite(hop.scale) and hop.scale > 0):
            raise MergeError(f"{where}: scale {hop.scale!r} must be a finite positive number")
    return [Hop(hop.model, int(hop.layer), float(hop.scale)) for hop in hops]


def _is_a(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def cumulative_scales(path: Iterable[HopLike]) -> list[float]:
    """c_k = s_1 * ... * s_k for every hop k (what export divides o_proj and down_proj by)."""
    out, c = [], 1.0
    for hop in as_path(path):
        c *= hop.scale
        out.append(c)
    return out


def _check_compatible(configs: Mapping[str, dict[str, Any]]) -> None:
    """Same architecture and layer shapes, else one line listing each model's."""

    def signature(config: dict[str, Any]) -> tuple:
        arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        return (arch, *(config.get(key) for key in _SHAPE_KEYS))

    sigs = {ref: signature(c) for ref, c in configs.items()}
    if len(set(sigs.values())) > 1:
        listing = ", ".join(f"{ref} is {s[0]} (hidden size {s[1]})" for ref, s in sigs.items())
        raise MergeError(
            "stacking: models of different architectures or hidden sizes cannot be stacked: "
            + listing
        )


# ---------------------------------------------------------------------------------------------
# In memory


class HopLayer(nn.Module):
    """A shared decoder layer at one hop: scales its input, and gives the attention this hop's
    own KV-cache slot (transformers' attention modules key the cache by `self_attn.layer_idx`)."""

    def __init__(self, layer: nn.Module, index: int, scale: float):
        super().__init__()
        self.layer = layer
        self.index = index
        self.scale = float(scale)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        attention = self.layer.self_attn
        source_index = attention.layer_idx
        attention.layer_idx = self.index
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            attention.layer_idx = source_index

    def extra_repr(self) -> str:
        return f"hop={self.index}, scale={self.scale:g}"


def _decoder(model: nn.Module) -> nn.Module:
    """The module holding `layers` (`model.model` for *ForCausalLM)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise MergeError(
            f"stacking: {type(model).__name__} has no decoder layer list (model.layers); "
            "only Llama-style causal LMs can be stacked"
        )
    return inner


class StackedModel:
    """Source models held once, and `.model`: a causal LM running a path over their layers.

    `models` maps names (as used in the hops) to loaded same-architecture causal LMs on one device
    and dtype; `base` (default: the first) supplies embeddings, final norm, lm_head, the config
    and generation config. `.model` is an instance of the base's class and can be given to
    lm-eval's HFLM; `set_path` changes it in place.
    """

    def __init__(
        self, models: Mapping[str, nn.Module], path: Iterable[HopLike], base: str | None = None
    ):
        if not models:
            raise MergeError("stacking: no source models")
        self.models = dict(models)
        self.base = base if base is not None else next(iter(self.models))
        if self.base not in self.models:
            raise MergeError(f"stacking: base {self.base!r} is not among the models")
        _check_compatible({ref: m.config.to_dict() for ref, m in self.models.items()})
        for ref, m in self.models.items():
            if getattr(m.config, "is_heterogeneous", False):
                raise MergeError(f"stacking: {ref} has per-layer config overrides (unsupported)")
        placements = {(p.device, p.dtype) for m in self.models.values() for p in m.parameters()}
        if len(placements) > 1:
            raise MergeError("stacking: the models must share one device and dtype")
        self._layers = {ref: _decoder(m).layers for ref, m in self.models.items()}
        self.path = self._check(path)
        self.model = self._build()

    def _check(self, path: Iterable[HopLike]) -> list[Hop]:
        return check_path(path, {ref: len(layers) for ref, layers in self._layers.items()})

    def _build(self) -> nn.Module:
        source = self.models[self.base]
        config = copy.deepcopy(source.config)
        config.num_hidden_layers = len(self.path)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = layer_types(_sources(self.path), self._configs())
        with torch.device("meta"):  # a skeleton: every module with weights is replaced below
            model = type(source)(config)
        inner, source_inner = _decoder(model), _decoder(source)
        for name, child in source.named_children():
            if child is not source_inner:
                setattr(model, name, child)
        for name, child in source_inner.named_children():
            if name != "layers":
                setattr(inner, name, child)
        model.generation_config = copy.deepcopy(source.generation_config)
        self._install(model)
        tensors = [*model.named_parameters(), *model.named_buffers()]
        left = [name for name, t in tensors if t.is_meta]
        if left:
            raise MergeError(f"stacking: {type(model).__name__} has unshared weights ({left[0]})")
        return model.eval()

    def _configs(self) -> dict[str, Any]:
        return {ref: m.config for ref, m in self.models.items()}

    def _install(self, model: nn.Module) -> None:
        inner = _decoder(model)
        inner.layers = nn.ModuleList(
            HopLayer(self._layers[hop.model][hop.layer], k, hop.scale)
            for k, hop in enumerate(self.path)
        )
        model.config.num_hidden_layers = len(self.path)
        if getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = layer_types(_sources(self.path), self._configs())
            if hasattr(inner, "has_sliding_layers"):  # Qwen2 caches this at construction
                inner.has_sliding_layers = "sliding_attention" in model.config.layer_types

    def set_path(self, path: Iterable[HopLike]) -> nn.Module:
        """Run `path` from now on (same `.model` object; no weights are copied)."""
        self.path = self._check(path)
        self._install(self.model)
        return self.model

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return export_state_dict(self.models, self.path, self.base)


# ---------------------------------------------------------------------------------------------
# Export


def _export_names(
    path: list[Hop], base: str, names: Mapping[str, Iterable[str]]
) -> Iterator[tuple[str, str, str, float | None]]:
    """(output name, model, source name, factor or None) for every output tensor: the base's
    embeddings, the hops' layers (with 1 / c_k on o_proj and down_proj), then the base's rest."""
    layers: dict[str, dict[int, list[str]]] = {}
    outer: list[str] = []
    prefix = "model.layers"
    for ref in dict.fromkeys([base, *(h.model for h in path)]):
        by_index = layers.setdefault(ref, {})
        for name in names[ref]:
            parts = layer_of(name)
            if parts and parts[0].endswith("layers"):
                prefix = parts[0]
                by_index.setdefault(parts[1], []).append(parts[2])
            elif ref == base:
                outer.append(name)
    yield from ((n, base, n, None) for n in outer if "embed" in n)
    for k, (hop, c) in enumerate(zip(path, cumulative_scales(path), strict=True)):
        for rest in layers[hop.model][hop.layer]:
            factor = 1.0 / c if any(f in rest for f in FOLDED) else None
            yield f"{prefix}.{k}.{rest}", hop.model, f"{prefix}.{hop.layer}.{rest}", factor
    yield from ((n, base, n, None) for n in outer if "embed" not in n)


def _fold(tensor: torch.Tensor, factor: float | None) -> torch.Tensor:
    return tensor.clone() if factor is None else tensor * factor


def export_state_dict(
    models: Mapping[str, nn.Module], path: Iterable[HopLike], base: str | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `path` (copies, scales folded), from loaded models."""
    base = base if base is not None else next(iter(models))
    path = check_path(path, {ref: len(_decoder(m).layers) for ref, m in models.items()})
    states = {ref: m.state_dict() for ref, m in models.items()}
    if getattr(models[base].config, "tie_word_embeddings", False):
        states[base].pop("lm_head.weight", None)  # as save_pretrained writes tied weights
    return {
        out: _fold(states[ref][name], factor)
        for out, ref, name, factor in _export_names(path, base, states)
    }


def _sources(path: list[Hop]) -> list[tuple[str, int]]:
    return [(hop.model, hop.layer) for hop in path]


def stacked_config(
    configs: Mapping[str, dict[str, Any]], path: list[Hop], base: str
) -> dict[str, Any]:
    """The base's config.json with num_hidden_layers (and layer_types) following the path."""
    return layered_config(configs[base], _sources(path), configs)


def write_checkpoint(
    model_dirs: Mapping[str, str | pathlib.Path],
    path: Iterable[HopLike],
    out_dir: str | pathlib.Path,
    *,
    base: str | None = None,
    overwrite: bool = False,
    out_shard_size: str | int = "5GB",
) -> pathlib.Path:
    """Write `path` as a standard checkpoint of the base's architecture, streaming tensor by
    tensor from `model_dirs` (name -> folder or Hub id): safetensors, patched config.json, the
    base's tokenizer and generation config, and the path as evomerge_path.json. The folder is
    staged as a hidden sibling and renamed into place at the end."""
    out_dir = pathlib.Path(out_dir)
    check_output_dir(out_dir, overwrite)
    base = base if base is not None else next(iter(model_dirs))
    if base not in model_dirs:
        raise MergeError(f"stacking: base {base!r} is not among the models")
    ckpts = {ref: Checkpoint(ref, resolve_model_dir(str(d))) for ref, d in model_dirs.items()}
    try:
        check_not_an_input(out_dir, [c.path for c in ckpts.values()])
        _check_compatible({ref: {**c.text_config, **c.config} for ref, c in ckpts.items()})
        hops = check_path(path, {ref: c.num_layers for ref, c in ckpts.items()})
        items = list(_export_names(hops, base, {ref: c.tensors for ref, c in ckpts.items()}))
        entries = []
        for out, ref, name, _ in items:
            info = ckpts[ref].tensors[name]
            entries.append(Entry(out, info.shape, info.dtype))
        with staged_dir(out_dir, overwrite=overwrite) as staging:
            with ShardedWriter(staging, entries, parse_size(out_shard_size)) as writer:
                for out, ref, name, factor in items:
                    tensor = _fold(ckpts[ref].read(name), factor)
                    check_finite(out, tensor)
                    writer.write(out, tensor)
            config = stacked_config({ref: c.config for ref, c in ckpts.items()}, hops, base)
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            donor = ckpts[base].path
            for file in [*TOKENIZER_FILES, "generation_config.json"]:
                if (donor / file).is_file():
                    shutil.copy2(donor / file, staging / file)
            record = {"base": base, "path": [asdict(h) for h in hops]}
            (staging / PATH_FILE).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
    return out_dir


def passthrough_recipe(
    path: Iterable[HopLike], model_refs: Mapping[str, str], base: str | None = None
) -> dict[str, Any]:
    """The mergekit `passthrough` recipe (one slice per hop, `scale` filtered onto o_proj and
    down_proj) that `evomerge merge` / mergekit-yaml turn into the same tensors as the export.

    mergekit takes the embeddings from the first slice's model and the final norm and lm_head
    from the last slice's, so the path must start and end with a layer of the base model.
    """
    base = base if base is not None else next(iter(model_refs))
    hops = check_path(path, dict.fromkeys(model_refs))  # layer ranges: checked by the merge
    if hops[0].model != base or hops[-1].model != base:
        raise MergeError(
            f"stacking: a passthrough recipe takes embeddings from the first hop's model and "
            f"lm_head from the last's; this path starts with {hops[0].model} and ends with "
            f"{hops[-1].model}, not the base {base} (use write_checkpoint)"
        )
    slices = []
    for hop, c in zip(hops, cumulative_scales(hops), strict=True):
        layers = [hop.layer, hop.layer + 1]
        source: dict[str, Any] = {"model": model_refs[hop.model], "layer_range": layers}
        if c != 1.0:
            scale = [{"filter": f, "value": 1.0 / c} for f in FOLDED]
            source["parameters"] = {"scale": [*scale, {"value": 1.0}]}
        slices.append({"sources": [source]})
    return {"merge_method": "passthrough", "slices": slices}
