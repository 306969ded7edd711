"""Linear: a weighted average of the inputs (model soups)."""

from __future__ import annotations

import torch

from evomerge.merge.methods import MergeMethod, ParamSpec, Scope, register


def _linear(group, shared, per_input, generators):
    first = group.tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in per_input], dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(group.tensors, weights, strict=True):
        result.addcmul_(tensor, weight.to(first.device))
    if shared["normalize"]:
        result.div_(weights.sum().to(first.device))
    return result.to(first.dtype)


register(
    MergeMethod(
        name="linear",
        params=(
            ParamSpec("weight", float, Scope.INPUT),
            ParamSpec("normalize", bool, Scope.SHARED, True),
        ),
        merge=_linear,
        description="Linear: the weighted average of the models' parameters.",
        reference="https://arxiv.org/abs/2203.05482",
    )
)
