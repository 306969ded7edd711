"""In-memory merging for search: source tensors stay resident on a device, and each candidate's
parameters are materialized straight into one preallocated model, in place, with no disk I/O.

Task-vector methods keep the base and the stacked deltas (model - base) resident instead of the
fine-tuned models, so a candidate costs one pass of the merge math per tensor. The math is the
same function the file merge calls, so both give the same tensors for the same recipe and seed.

Placement (`placement=`): `device` keeps the sources on the device beside the model; `host`
keeps them in host memory (pinned for CUDA) and streams each task's tensors to the device while
the previous task computes, so device memory holds the model and one task's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from evomerge.merge.compute import compute_task, generators_for, input_tensors, resolve_device
from evomerge.merge.errors import MergeError
from evomerge.merge.materialize import output_config
from evomerge.merge.methods import TensorGroup, fused, get_method
from evomerge.merge.methods.task_arithmetic import merge_deltas, stack_deltas
from evomerge.merge.plan import MergePlan, TensorTask, build_plan, reresolve
from evomerge.merge.recipe import Recipe

TaskParameters = tuple[dict[str, Any], list[dict[str, Any]]]
PLACEMENTS = ("device", "host")


class ResidentMerger:
    """Holds a recipe's source tensors on `device` and writes merges into models in place."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        device: str = "auto",
        seed: int = 0,
        allow_pickle: bool = False,
        placement: str = "device",
    ):
        if placement not in PLACEMENTS:
            raise MergeError(f"sources: {placement!r}; use one of {', '.join(PLACEMENTS)}")
        self.device = resolve_device(device)
        self.placement = placement
        self.home = self.device if placement == "device" else torch.device("cpu")
        self.seed = seed
        self.plan: MergePlan = build_plan(recipe, allow_pickle=allow_pickle)
        extras = self.plan.method.extras
        self._task_vectors = "sparsification" in extras
        self._inputs: list[list[torch.Tensor]] = []
        self._deltas: list[torch.Tensor | None] = []
        loaded: dict[tuple[str, str], torch.Tensor] = {}

        def read(model: str, name: str) -> torch.Tensor:
            key = (model, name)
            if key not in loaded:
                loaded[key] = self.plan.checkpoints[model].read(name, self.home)
            return loaded[key]

        for task in self.plan.tasks:
            tensors = input_tensors(self.plan, task, read)
            if self._uses_deltas(task, tensors):
                group = TensorGroup(tensors, task.base_index, task.out_name)
                deltas = stack_deltas(group)
                if self.home == self.device:  # what fused.c keeps per task vector, made now
                    fused.prepare(deltas, extras["sparsification"])
                self._deltas.append(deltas)
                self._inputs.append([group.base])
            else:
                self._deltas.append(None)
                self._inputs.append(tensors)
        for ckpt in self.plan.checkpoints.values():
            ckpt.close()
        if self.home != self.device and self.device.type == "cuda":
            self._inputs = [[t.pin_memory() for t in ts] for ts in self._inputs]
            self._deltas = [None if d is None else d.pin_memory() for d in self._deltas]

    def _uses_deltas(self, task: TensorTask, tensors: list[torch.Tensor]) -> bool:
        return (
            self._task_vectors
            and task.base_index is not None
            and len(tensors) > 1
            and tensors[0].is_floating_point()
        )

    @property
    def tasks(self) -> list[TensorTask]:
        return self.plan.tasks

    def resident_bytes(self) -> int:
        tensors = {id(t): t for ts in self._inputs for t in ts}
        tensors.update({id(d): d for d in self._deltas if d is not None})
        derived = sum(fused.derived_bytes(d) for d in self._deltas if d is not None)
        return derived + sum(t.numel() * t.element_size() for t in tensors.values())

    def build_model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """An empty model of the merge's architecture on the device, ready for `materialize`."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config_dict = output_config(self.plan)
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        dtype = dtype or self.plan.tasks[0].out_dtype
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.materialize(model)
        return model.eval()

    def tokenizer(self):
        """The merged model's tokenizer."""
        from transformers import AutoTokenizer

        if self.plan.vocabulary is not None:
            return self.plan.vocabulary.tokenizer
        return AutoTokenizer.from_pretrained(self.plan.checkpoints[self.plan.config_model].path)

    def set_recipe(self, recipe: Recipe) -> None:
        """New parameter values for the same models and slices. The method may change only from
        one task-vector method to another (task_arithmetic, ties, dare_ties ...): the resident
        base and deltas serve them all alike."""
        previous = self.plan.method
        if recipe.merge_method != previous.name:
            method = get_method(recipe.merge_method)
            if not (self._task_vectors and "sparsification" in method.extras):
                raise MergeError(
                    f"set_recipe: a resident {previous.name} merger cannot make a "
                    f"{method.name} merge (only task-vector methods share their inputs)"
                )
            self.plan.method = method
        try:
            reresolve(self.plan, recipe)
        except BaseException:
            self.plan.method = previous
            raise

    def set_parameters(self, parameters: list[TaskParameters]) -> None:
        """Per-tensor parameters directly, one (shared, per_input) pair per task in order."""
        if len(parameters) != len(self.plan.tasks):
            raise ValueError(
                f"expected {len(self.plan.tasks)} parameter sets, got {len(parameters)}"
            )
        for task, (shared, per_input) in zip(self.plan.tasks, parameters, strict=True):
            task.shared, task.per_input = shared, per_input

    @torch.no_grad()
    def materialize(self, model: nn.Module, recipe: Recipe | None = None) -> None:
        """Write the merge into `model`'s parameters in place (their storage is kept)."""
        if recipe is not None:
            self.set_recipe(recipe)
        targets = self._targets(model)
        for task, inputs, deltas in self._on_device():
            target = targets[task.out_name]
            if deltas is None:
                if self._writes_into(task, inputs, target):
                    group = TensorGroup(inputs, task.base_index, task.out_name)
                    self.plan.method.merge_into(group, task.shared, task.per_input, None, target)
                else:
                    target.copy_(compute_task(self.plan, task, inputs, self.seed, self.device))
                continue
            params = [p for i, p in enumerate(task.per_input) if i != task.base_index]
            generators = (
                generators_for(task, self.seed, self.device)
                if self.plan.method.stochastic
                else None
            )
            direct = target.dtype == task.compute_dtype and target.device == inputs[0].device
            result = merge_deltas(
                inputs[0],
                deltas,
                task.shared,
                params,
                generators,
                sparsification=self.plan.method.extras["sparsification"],
                consensus=self.plan.method.extras["consensus"],
                out=target if direct else None,
            )
            if not direct:
                target.copy_(result)
            del result  # not alive while the next tensor merges (the memory plan counts one)

    def _writes_into(self, task: TensorTask, inputs: list[torch.Tensor], target: torch.Tensor):
        """The method can write this task straight into the model's parameter."""
        method = self.plan.method
        return (
            method.merge_into is not None
            and not method.stochastic
            and inputs[0].is_floating_point()
            and target.dtype == task.compute_dtype == task.out_dtype
            and target.device == inputs[0].device
            and target.is_contiguous()
        )

    def _on_device(self) -> Iterator[tuple[TensorTask, list[torch.Tensor], torch.Tensor | None]]:
        """Each task with its inputs and deltas on the device. Host placement copies the next
        task's tensors on a side stream (CUDA) while the current one computes."""
        resident = zip(self.plan.tasks, self._inputs, self._deltas, strict=True)
        if self.home == self.device:
            yield from resident
            return
        cuda = self.device.type == "cuda"
        copies = torch.cuda.Stream(self.device) if cuda else None

        def fetch(inputs: list[torch.Tensor], deltas: torch.Tensor | None):
            with torch.cuda.stream(copies) if cuda else nullcontext():
                moved = [t.to(self.device, non_blocking=True) for t in inputs]
                return moved, None if deltas is None else deltas.to(self.device, non_blocking=True)

        items = list(resident)
        ahead = fetch(*items[0][1:]) if items else None
        for i, (task, _, _) in enumerate(items):
            if cuda:
                torch.cuda.current_stream(self.device).wait_stream(copies)
            inputs, deltas = ahead  # type: ignore[misc]
            for t in [*inputs, *([] if deltas is None else [deltas])]:
                if cuda:
                    t.record_stream(torch.cuda.current_stream(self.device))
            ahead = fetch(*items[i + 1][1:]) if i + 1 < len(items) else None
            yield task, inputs, deltas

    def _targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = dict(model.named_parameters())
        state.update(dict(model.named_buffers()))
        missing = [t.out_name for t in self.plan.tasks if t.out_name not in state]
        if missing:
            raise MergeError(f"the model has no parameter {missing[0]} (wrong architecture?)")
        for task in self.plan.tasks:
            if tuple(state[task.out_name].shape) != task.shape:
                raise MergeError(
                    f"{task.out_name}: model shape {tuple(state[task.out_name].shape)} "
                    f"!= merge shape {task.shape}"
                )
        return state
