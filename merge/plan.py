"""From a recipe to a merge plan: every output tensor with its inputs and resolved parameters.

Planning reads configs and safetensors headers only, so every structural problem (missing
models, layer ranges, shapes, architectures, parameters) is reported before any tensor is
read or computed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.merge.checkpoint import Checkpoint
from evomerge.merge.errors import MergeError
from evomerge.merge.layers import layer_of
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.merge.methods.sparsify import sparsity_problem
from evomerge.merge.parameters import check_parameter_names, resolve_tensor_parameters
from evomerge.merge.recipe import OutputSlice, Parameters, Recipe, SourceSlice
from evomerge.merge.refs import resolve_model_dir
from evomerge.merge.vocab import Vocabulary, build_vocabulary

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TensorTask:
    """One output tensor: `inputs[i]` is (model ref, tensor name) in the slice's source order."""

    out_name: str
    inputs: list[tuple[str, str]]
    base_index: int | None
    slice_index: int
    t: float
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    vocab_axis: int | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    per_input: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.out_dtype.itemsize

    def seed(self, base_seed: int, input_index: int) -> int:
        """A per-tensor, per-input seed: results do not depend on execution order."""
        key = f"{base_seed}:{self.out_name}:{input_index}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class LayerLayout:
    """Where a checkpoint keeps its decoder layers: `{prefix}.{i}.{suffix}`."""

    prefix: str
    suffixes: dict[int, list[str]]

    def name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]
    tasks: list[TensorTask]
    layer_sources: list[tuple[str, int]]
    """For each output layer: the (model, source layer) of its slice's first source."""
    config_model: str
    vocabulary: Vocabulary | None
    slices: list[OutputSlice]
    """The recipe's slices; a `models:` recipe is one slice over every layer."""

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)

    @property
    def total_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)

    def source_models(self) -> list[str]:
        return list(self.checkpoints)


def load_checkpoints(recipe: Recipe, allow_pickle: bool = False) -> dict[str, Checkpoint]:
    from evomerge.merge.lora import LoraCheckpoint, split_lora

    checkpoints: dict[str, Checkpoint] = {}
    for ref in recipe.referenced_models():
        folder = resolve_model_dir(ref, allow_pickle=allow_pickle)
        _, adapter = split_lora(ref)
        if adapter is None:
            checkpoints[ref] = Checkpoint(ref, folder, allow_pickle=allow_pickle)
        else:
            adapter_dir = resolve_model_dir(adapter, allow_pickle=allow_pickle)
            checkpoints[ref] = LoraCheckpoint(ref, folder, adapter_dir, allow_pickle=allow_pickle)
    return checkpoints


def build_plan(
    recipe: Recipe, *, allow_pickle: bool = False, checkpoints: dict[str, Checkpoint] | None = None
) -> MergePlan:
    method = get_method(recipe.merge_method)
    _check_parameter_names(recipe, method)
    checkpoints = checkpoints or load_checkpoints(recipe, allow_pickle)
    _check_architectures(checkpoints)
    slices = _normalized_slices(recipe, checkpoints)
    layouts = {ref: _layer_layout(ckpt) for ref, ckpt in checkpoints.items()}
    for index, out_slice in enumerate(slices):
        where = f"slices[{index}]" if recipe.slices else "models"
        _check_slice(out_slice, checkpoints, where)
        models = [s.model for s in out_slice.sources]
        method.check_inputs(models, out_slice.base_model or recipe.base_model, where)
    vocabulary = build_vocabulary(recipe, checkpoints)
    planner = _Planner(recipe, method, checkpoints, layouts, slices, vocabulary)
    tasks, layer_sources = planner.plan()
    config_model = recipe.base_model or recipe.referenced_models()[0]
    return MergePlan(
        recipe, method, checkpoints, tasks, layer_sources, config_model, vocabulary, slices
    )


def _check_parameter_names(recipe: Recipe, method: MergeMethod) -> None:
    check_parameter_names(method, recipe.parameters, "recipe")
    for i, model in enumerate(recipe.models or []):
        check_parameter_names(method, model.parameters, f"models[{i}]")
    for i, out_slice in enumerate(recipe.slices or []):
        check_parameter_names(method, out_slice.parameters, f"slices[{i}]")
        for j, source in enumerate(out_slice.sources):
            check_parameter_names(method, source.parameters, f"slices[{i}].sources[{j}]")


def _check_architectures(checkpoints: dict[str, Checkpoint]) -> None:
    archs = {ref: ckpt.architecture for ref, ckpt in checkpoints.items()}
    if len(set(archs.values())) > 1:
        listing = ", ".join(f"{ref} is {arch}" for ref, arch in archs.items())
        raise MergeError(f"models of different architectures cannot be merged: {listing}")


def _normalized_slices(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> list[OutputSlice]:
    """`models:` is one slice over all layers of every model, the base appended if absent."""
    if recipe.slices:
        return recipe.slices
    models = list(recipe.models or [])
    sources = [
        SourceSlice(
            model=m.model, layer_range=(0, checkpoints[m.model].num_layers), parameters=m.parameters
        )
        for m in models
    ]
    if recipe.base_model and recipe.base_model not in [m.model for m in models]:
        n = checkpoints[recipe.base_model].num_layers
        sources.append(SourceSlice(model=recipe.base_model, layer_range=(0, n)))
    counts = {s.model: s.layer_range[1] for s in sources}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{m} has {n}" for m, n in counts.items())
        raise MergeError(f"models: layer counts differ ({listing}); use slices to pick ranges")
    return [OutputSlice(sources=sources)]


def _check_slice(out_slice: OutputSlice, checkpoints: dict[str, Checkpoint], where: str) -> None:
    lengths = set()
    for j, source in enumerate(out_slice.sources):
        start, end = source.layer_range
        n = checkpoints[source.model].num_layers
        if end > n:
            raise MergeError(
                f"{where}.sources[{j}].layer_range: [{start}, {end}] is out of range for "
                f"{source.model}, which has {n} layers (valid: 0 to {n})"
            )
        lengths.add(end - start)
    if len(lengths) > 1:
        raise MergeError(f"{where}: all sources of a slice must span the same number of layers")


def _layer_layout(ckpt: Checkpoint) -> LayerLayout:
    by_prefix: dict[str, dict[int, list[str]]] = {}
    for name in ckpt.tensors:
        parts = layer_of(name)
        if parts:
            prefix, index, rest = parts
            by_prefix.setdefault(prefix, {}).setdefault(index, []).append(rest)
    expected = set(range(ckpt.num_layers))
    for prefix, layers in by_prefix.items():
        if set(layers) == expected:
            return LayerLayout(prefix, layers)
    raise MergeError(
        f"{ckpt.ref}: cannot find its {ckpt.num_layers} decoder layers among the tensor names"
    )


class _Planner:
    def __init__(self, recipe, method, checkpoints, layouts, slices, vocabulary):
        self.recipe: Recipe = recipe
        self.method: MergeMethod = method
        self.checkpoints: dict[str, Checkpoint] = checkpoints
        self.layouts: dict[str, LayerLayout] = layouts
        self.slices: list[OutputSlice] = slices
        self.vocabulary: Vocabulary | None = vocabulary

    def plan(self) -> tuple[list[TensorTask], list[tuple[str, int]]]:
        first, last = self.slices[0], self.slices[-1]
        anchor = self.checkpoints[first.sources[0].model]
        layer_names = {
            self.layouts[ref].name(i, s)
            for ref in self.layouts
            for i, suffixes in self.layouts[ref].suffixes.items()
            for s in suffixes
        }
        outer = [n for n in anchor.tensors if n not in layer_names]
        pre = [n for n in outer if "embed" in n]
        post = [n for n in outer if "embed" not in n]
        tasks = [self._task(n, [(s.model, n) for s in first.sources], 0, 0.0) for n in pre]
        layer_sources: list[tuple[str, int]] = []
        for slice_index, out_slice in enumerate(self.slices):
            start0, end0 = out_slice.sources[0].layer_range
            count = end0 - start0
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                out_layer = len(layer_sources)
                first_src = out_slice.sources[0]
                layer_sources.append((first_src.model, first_src.layer_range[0] + offset))
                layout0 = self.layouts[first_src.model]
                for suffix in layout0.suffixes[first_src.layer_range[0] + offset]:
                    inputs = [
                        (s.model, self.layouts[s.model].name(s.layer_range[0] + offset, suffix))
                        for s in out_slice.sources
                    ]
                    out_name = layout0.name(out_layer, suffix)
                    tasks.append(self._task(out_name, inputs, slice_index, t))
        last_index = len(self.slices) - 1
        tasks += [
            self._task(n, [(s.model, n) for s in last.sources], last_index, 0.0) for n in post
        ]
        return tasks, layer_sources

    def _task(
        self, out_name: str, inputs: list[tuple[str, str]], slice_index: int, t: float
    ) -> TensorTask:
        out_slice = self.slices[slice_index]
        infos = []
        for model, name in inputs:
            info = self.checkpoints[model].tensors.get(name)
            if info is None:
                raise MergeError(f"{model}: has no tensor {name} (architectures differ?)")
            infos.append(info)
        vocab_axis = self._vocab_axis(out_name, infos[0].shape)
        shape = infos[0].shape
        if vocab_axis is not None and self.vocabulary is not None:
            shape = (self.vocabulary.size, *shape[1:])
        else:
            for (model, name), info in zip(inputs, infos, strict=True):
                if info.shape != infos[0].shape:
                    hint = "; set tokenizer_source: union or base" if vocab_axis is not None else ""
                    raise MergeError(
                        f"{name}: shape {list(info.shape)} in {model} differs from "
                        f"{list(infos[0].shape)} in {inputs[0][0]}{hint}"
                    )
        stored = infos[0].dtype
        for info in infos[1:]:
            stored = torch.promote_types(stored, info.dtype)
        floating = stored.is_floating_point
        compute = DTYPES[self.recipe.dtype] if self.recipe.dtype and floating else stored
        out = DTYPES[self.recipe.out_dtype] if self.recipe.out_dtype and floating else compute
        base = out_slice.base_model or self.recipe.base_model
        models = [m for m, _ in inputs]
        base_index = models.index(base) if base in models else None
        task = TensorTask(
            out_name, inputs, base_index, slice_index, t, shape, compute, out, vocab_axis
        )
        resolve_task(self.recipe, self.method, self.slices, task)
        return task

    def _vocab_axis(self, name: str, shape: tuple[int, ...]) -> int | None:
        vocab = self.checkpoints[self.slices[0].sources[0].model].vocab_size
        if ("embed" in name or "lm_head" in name) and shape and shape[0] == vocab:
            return 0
        return None


def resolve_task(
    recipe: Recipe, method: MergeMethod, slices: list[OutputSlice], task: TensorTask
) -> None:
    """(Re)compute a task's parameters from a recipe with the same structure."""
    out_slice = slices[task.slice_index]
    models = [m for m, _ in task.inputs]
    source_scopes: list[list[Parameters | None]] = [
        [s.parameters for s in out_slice.sources if s.model == model] for model in models
    ]
    task.shared, task.per_input = resolve_tensor_parameters(
        method,
        out_name=task.out_name,
        input_names=[n for _, n in task.inputs],
        input_models=models,
        base_index=task.base_index,
        source_scopes=source_scopes,
        slice_scope=out_slice.parameters,
        top_scope=recipe.parameters,
        t=task.t,
    )
    kind = method.extras.get("sparsification")
    if kind is not None:
        task.shared["selection"] = recipe.selection or "mergekit"
        for (model, _), params in zip(task.inputs, task.per_input, strict=True):
            problem = sparsity_problem(kind, params)
            if problem is not None:
                raise MergeError(f"{model}: {method.name} {problem} (for {task.out_name})")


def reresolve(plan: MergePlan, recipe: Recipe) -> None:
    """Point an existing plan at new parameter values (same models, slices and method)."""
    slices = _normalized_slices(recipe, plan.checkpoints)
    if _structure(slices) != _structure(plan.slices) or recipe.base_model != plan.recipe.base_model:
        raise MergeError("the new recipe must keep the models, base model and layer ranges")
    _check_parameter_names(recipe, plan.method)
    for task in plan.tasks:
        resolve_task(recipe, plan.method, slices, task)
    plan.recipe = recipe
    plan.slices = slices


def _structure(slices: list[OutputSlice]) -> list:
    return [
        (s.base_model, [(src.model, tuple(src.layer_range)) for src in s.sources]) for s in slices
    ]
