"""Task-vector methods that weigh models by agreement rather than by given weights: SCE
(select by variance, weight by energy, erase sign conflicts) and RAM / RAM+ (average where
several models change an entry, keep a unique change whole)."""

from __future__ import annotations

import torch

from evomerge.merge.methods import BasePolicy, MergeMethod, ParamSpec, Scope, register


def _sce(group, shared, per_input, generators):
    base = group.base
    inputs = group.non_base
    if not inputs:
        return base
    mask_dtype = torch.int8 if shared["int8_mask"] else base.dtype
    deltas = torch.stack([t - base for t in inputs], dim=0)
    if shared["select_topk"] < 1:
        deltas = deltas * _top_variance_mask(deltas, shared["select_topk"], mask_dtype)
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    agree = sign == majority
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    weights = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    while weights.dim() < deltas.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * agree
    merged = (deltas * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
    return base + merged


def _top_variance_mask(deltas: torch.Tensor, share: float, dtype: torch.dtype) -> torch.Tensor:
    """Keep the `share` of nonzero-variance entries where the models' task vectors vary most."""
    if share <= 0:
        return torch.zeros_like(deltas[0], dtype=dtype)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * share)
    mask = torch.zeros_like(variance, dtype=dtype)
    if k:
        _, indices = torch.topk(variance.abs().view(-1), k=k, largest=True)
        mask.view(-1)[indices] = 1
    return mask


def _ram_parts(group, epsilon: float):
    inputs = group.non_base
    flat = torch.stack([t - group.base for t in inputs], dim=0).view(len(inputs), -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return flat * changed, changed, counts, counts > 1, counts == 1


def _ram(group, shared, per_input, generators):
    if not group.non_base:
        return group.base
    kept, _, counts, overlap, unique = _ram_parts(group, shared["epsilon"])
    merged = ((kept * unique) + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return group.base + merged.reshape_as(group.base)


def _ramplus_tl(group, shared, per_input, generators):
    if not group.non_base:
        return group.base
    epsilon = shared["epsilon"]
    kept, changed, counts, overlap, unique = _ram_parts(group, epsilon)
    rho = (changed & overlap).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + shared["r"] * rho.clamp(min=0, max=shared["alpha"])
    merged = (
        (kept * unique * boost.unsqueeze(-1)) + (kept * overlap / counts.clamp(min=1))
    ).sum(dim=0, keepdim=True)
    return group.base + merged.reshape_as(group.base)


register(
    MergeMethod(
        name="sce",
        params=(
            ParamSpec("int8_mask", bool, Scope.SHARED, False),
            ParamSpec("select_topk", float, Scope.SHARED, 1.0),
        ),
        merge=_sce,
        base=BasePolicy.REQUIRED,
        description="SCE: select high-variance entries, weight task vectors by their energy, "
        "erase sign conflicts.",
        reference="https://arxiv.org/abs/2408.07990",
    )
)
register(
    MergeMethod(
        name="ram",
        params=(ParamSpec("epsilon", float, Scope.SHARED, 1e-5),),
        merge=_ram,
        base=BasePolicy.REQUIRED,
        description="RAM: keep a change only one model makes, average changes several make.",
        reference="https://arxiv.org/abs/2601.13572",
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        params=(
            ParamSpec("r", float, Scope.SHARED, 0.1),
            ParamSpec("alpha", float, Scope.SHARED, 0.2),
            ParamSpec("epsilon", float, Scope.SHARED, 1e-5),
        ),
        merge=_ramplus_tl,
        base=BasePolicy.REQUIRED,
        description="RAM+ (tensor-local): RAM with unique changes boosted by how much each "
        "model's changes overlap the others'.",
        reference="https://arxiv.org/abs/2601.13572",
    )
)
