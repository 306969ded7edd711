"""Linear: a weighted average of the inputs (model soups)."""

from __future__ import annotations

import torch

from evomerge.merge.methods import MergeMethod, ParamSpec, Scope, chunks, fused, register


def _linear(group, shared, per_input, generators):
    first = group.tensors[0]
    out = torch.empty_like(first, memory_format=torch.contiguous_format)
    return _linear_into(group, shared, per_input, generators, out)


def _linear_into(group, shared, per_input, generators, out: torch.Tensor) -> torch.Tensor:
    """mergekit's sum of weight * tensor in float32 (float64 inputs: float64), divided by the
    summed weights, written into `out` (contiguous, the inputs' dtype) a span at a time."""
    first = group.tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    values = tuple(p["weight"] for p in per_input)
    in_dtype = torch.tensor(values, dtype=dtype)  # the weights as the eager path rounds them
    summed = in_dtype.sum().item()
    rounded = tuple(in_dtype.tolist())
    if dtype == torch.float32 and fused.linear(
        group.tensors, rounded, shared["normalize"], summed, out
    ):
        return out
    weights = chunks.constants(values, dtype, first.device)
    total = chunks.constants((summed,), dtype, first.device)
    flat = [t.reshape(-1) for t in group.tensors]
    flat_out = out.view(-1)
    size = chunks.span_size(first.numel(), device=first.device)
    buffer = torch.empty(size, dtype=dtype, device=first.device)
    for start, stop in chunks.spans(first.numel(), device=first.device):
        result = buffer[: stop - start].zero_()
        for tensor, weight in zip(flat, weights, strict=True):
            result.addcmul_(tensor[start:stop], weight)
        if shared["normalize"]:
            result.div_(total)
        flat_out[start:stop].copy_(result)
    return out


register(
    MergeMethod(
        name="linear",
        params=(
            ParamSpec("weight", float, Scope.INPUT),
            ParamSpec("normalize", bool, Scope.SHARED, True),
        ),
        merge=_linear,
        merge_into=_linear_into,
        description="Linear: the weighted average of the models' parameters.",
        reference="https://arxiv.org/abs/2203.05482",
    )
)
