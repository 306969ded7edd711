"""Computing one output tensor of a plan from its input tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from evomerge.merge.errors import MergeError
from evomerge.merge.methods import TensorGroup
from evomerge.merge.plan import MergePlan, TensorTask
from evomerge.merge.vocab import permute_rows

Reader = Callable[[str, str], torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergeError(f"--device: {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def generators_for(task: TensorTask, seed: int, device: torch.device):
    def generator(i: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(task.seed(seed, i))

    # What a fresh generator would start from, for fused.c's draws without making one.
    generator.seed = lambda i: task.seed(seed, i)  # type: ignore[attr-defined]
    generator.device = device  # type: ignore[attr-defined]
    return generator


def input_tensors(plan: MergePlan, task: TensorTask, read: Reader) -> list[torch.Tensor]:
    """The task's inputs in its compute dtype, with vocabulary rows re-indexed if needed."""
    tensors = [read(model, name) for model, name in task.inputs]
    if tensors[0].is_floating_point():
        tensors = [t.to(task.compute_dtype) for t in tensors]
    if task.vocab_axis is not None and plan.vocabulary is not None:
        base = plan.slices[task.slice_index].base_model
        tensors = permute_rows(
            plan.vocabulary, [m for m, _ in task.inputs], tensors, base or plan.recipe.base_model
        )
    return tensors


def compute_task(
    plan: MergePlan, task: TensorTask, tensors: list[torch.Tensor], seed: int, device: torch.device
) -> torch.Tensor:
    if not tensors[0].is_floating_point():
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise MergeError(f"{task.out_name}: non-float tensor differs between inputs")
        return tensors[0]
    group = TensorGroup(tensors, task.base_index, task.out_name)
    generators = generators_for(task, seed, device) if plan.method.stochastic else None
    result = plan.method.merge(group, task.shared, task.per_input, generators)
    return result.to(task.out_dtype)
