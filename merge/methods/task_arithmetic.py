"""Task-vector methods: task arithmetic, TIES, DARE, breadcrumbs and DELLA (mergekit's
"generalized task arithmetic"): sparsify each model's delta from the base, weight the deltas,
optionally keep only those agreeing with the majority sign, sum, normalize, scale by lambda.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.methods import (
    BasePolicy,
    Generators,
    MergeMethod,
    ParamSpec,
    Scope,
    TensorGroup,
    chunks,
    fused,
    register,
)
from evomerge.merge.methods import sparsify as sp


def sparsify(
    kind: str | None,
    delta: torch.Tensor,
    params: dict[str, Any],
    rescale: bool,
    generator: torch.Generator | None,
    selection: str = "mergekit",
) -> torch.Tensor:
    density = params["density"]
    if kind is None:
        return delta
    if kind == "magnitude":
        return sp.magnitude(delta, density, rescale, selection)
    if kind == "random":
        return sp.bernoulli(delta, density, rescale, generator)
    if kind == "magnitude_outliers":
        return sp.magnitude_outliers(delta, density, rescale, params["gamma"], selection)
    if kind == "della_magprune":
        return sp.della_magprune(delta, density, rescale, params["epsilon"], generator)
    raise ValueError(kind)


def merge_deltas(
    base: torch.Tensor,
    deltas: torch.Tensor,
    shared: dict[str, Any],
    params: list[dict[str, Any]],
    generators: Generators | None,
    *,
    sparsification: str | None,
    consensus: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge stacked task vectors `deltas[i] = model_i - base` into the base.

    `deltas` is not modified, so the in-memory merger can keep it resident across candidates.
    On a CPU the combine runs fused (fused.py) where it can, TIES' fast magnitude selection
    inside it, DARE's and DELLA's masks drawn by fused.c before it; the result is the eager
    path's bit for bit.
    """
    weights = chunks.constants(tuple(p["weight"] for p in params), deltas.dtype, deltas.device)
    target = out
    if out is None or not out.is_contiguous():
        target = torch.empty_like(base, memory_format=torch.contiguous_format)
    cuts = None
    if fused.selects_in_combine(
        sparsification, consensus, shared, deltas.dtype
    ) and fused.usable(base, deltas):
        cuts = fused.magnitude_cuts(deltas, [p["density"] for p in params])
    done = cuts is not None and fused.combine(
        base, deltas, weights, shared, consensus, target, cuts
    )
    if not done and sparsification in ("random", "della_magprune") and fused.usable(base, deltas):
        drawn = fused.random_sparsified(
            deltas, sparsification, params, generators, shared["rescale"]
        )
        if drawn is not None:
            sparse, scales = drawn
            done = fused.combine(base, sparse, weights, shared, consensus, target, scales=scales)
            assert done, "fused.usable held for the task vectors"
    if not done:
        if sparsification is not None:
            deltas = _sparsified(deltas, shared, params, generators, sparsification)
        if not fused.combine(base, deltas, weights, shared, consensus, target):
            _combine(base, deltas, weights, shared, consensus, target)
    if out is None:
        return target
    return out if target is out else out.copy_(target)


def _sparsified(deltas, shared, params, generators, sparsification) -> torch.Tensor:
    sparse = torch.empty_like(deltas)
    for i, delta in enumerate(deltas):
        generator = generators(i) if generators is not None else None
        selection = shared.get("selection", "mergekit")
        sparse[i] = sparsify(
            sparsification, delta, params[i], shared["rescale"], generator, selection
        )
    return sparse


def _combine(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    shared: dict[str, Any],
    consensus: bool,
    out: torch.Tensor,
) -> None:
    """out = base + lambda * sum_i(w_i * delta_i [agreeing with the elected sign]) / divisor,
    mergekit's steps in its dtype, a span at a time (chunks.py); fused.c does the same."""
    n = deltas.shape[0]
    flat_base, flat_out = base.reshape(-1), out.view(-1)
    flat_deltas = deltas.reshape(n, -1)
    column = weights.reshape(n, 1)
    size = chunks.span_size(flat_base.numel(), chunks.LONG, base.device)
    weighted_buf = deltas.new_empty((n, size))
    mixed_buf = base.new_empty(size)
    if consensus:
        # TIES sign election by summed weighted mass ("sum" consensus); zeros never agree.
        mask_buf = torch.empty((n, size), dtype=torch.bool, device=base.device)
        nonzero_buf = torch.empty_like(mask_buf)
        positive_buf = torch.empty(size, dtype=torch.bool, device=base.device)
        kept_buf = torch.empty_like(weighted_buf)  # the mask as 0/1 in the dtype (see below)
        divisor_buf = torch.empty_like(mixed_buf)
    elif shared["normalize"]:
        divisor = weights.sum(dim=0, keepdim=True)
        divisor[divisor.abs() < 1e-8] = 1
    for start, stop in chunks.spans(flat_base.numel(), chunks.LONG, base.device):
        m = stop - start
        weighted, mixed = weighted_buf[:, :m], mixed_buf[:m]
        torch.mul(flat_deltas[:, start:stop], column, out=weighted)
        if consensus:
            mask, nonzero, positive = mask_buf[:, :m], nonzero_buf[:, :m], positive_buf[:m]
            torch.ge(_sum_models(weighted, mixed), 0, out=positive)
            torch.gt(weighted, 0, out=mask).eq_(positive)
            mask.logical_and_(torch.ne(weighted, 0, out=nonzero))
            # x * mask promotes the mask to x's dtype; converting it once is the same product
            # and spares two slow mixed-dtype kernels.
            kept = kept_buf[:, :m].copy_(mask)
            _sum_models(weighted.mul_(kept), mixed)
            divisor = _sum_models(kept.mul_(column), divisor_buf[:m])
            divisor.masked_fill_(divisor == 0, 1)
        else:
            _sum_models(weighted, mixed)
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        torch.add(flat_base[start:stop], mixed, out=flat_out[start:stop])


def span_bytes(models: int, itemsize: int, consensus: bool) -> int:
    """Bytes of `_combine`'s buffers per span entry for `models` task vectors."""
    weighted_and_mixed = (models + 1) * itemsize
    if not consensus:
        return weighted_and_mixed
    masks = 2 * models + 1  # bool: agreement, nonzero, positive majority
    return weighted_and_mixed + masks + (models + 1) * itemsize  # kept, divisor


def _sum_models(stacked: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`stacked.sum(dim=0)` into `out`; for two models one add, which rounds the same and is
    faster on CPU."""
    if stacked.shape[0] == 2:
        return torch.add(stacked[0], stacked[1], out=out)
    return torch.sum(stacked, dim=0, out=out)


def stack_deltas(group: TensorGroup) -> torch.Tensor:
    base = group.base
    others = group.non_base
    deltas = base.new_empty((len(others), *base.shape))
    for i, tensor in enumerate(others):
        torch.sub(tensor, base, out=deltas[i])
    return deltas


def _make(
    name: str,
    sparsification: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    description: str,
    reference: str,
) -> MergeMethod:
    params = [
        ParamSpec("int8_mask", bool, Scope.SHARED, False),
        ParamSpec("normalize", bool, Scope.SHARED, normalize),
        ParamSpec("rescale", bool, Scope.SHARED, rescale),
        ParamSpec("lambda", float, Scope.SHARED, 1.0),
        ParamSpec("weight", float, Scope.NON_BASE),
        ParamSpec("density", float, Scope.NON_BASE, 1.0),
    ]
    if sparsification == "magnitude_outliers":
        params.append(ParamSpec("gamma", float, Scope.NON_BASE, 0.01))
    if sparsification == "della_magprune":
        params.append(ParamSpec("epsilon", float, Scope.NON_BASE, 0.15))

    def merge(group, shared, per_input, generators):
        if len(group.tensors) == 1:
            return group.base
        non_base = [p for i, p in enumerate(per_input) if i != group.base_index]
        return merge_deltas(
            group.base,
            stack_deltas(group),
            shared,
            non_base,
            generators,
            sparsification=sparsification,
            consensus=consensus,
        )

    return register(
        MergeMethod(
            name=name,
            params=tuple(params),
            merge=merge,
            base=BasePolicy.REQUIRED,
            stochastic=sparsification in ("random", "della_magprune"),
            description=description,
            reference=reference,
            extras={"sparsification": sparsification, "consensus": consensus},
        )
    )


_make(
    "task_arithmetic",
    None,
    False,
    False,
    False,
    "Task Arithmetic: base plus the weighted sum of task vectors.",
    "https://arxiv.org/abs/2212.04089",
)
_make(
    "ties",
    "magnitude",
    True,
    True,
    False,
    "TIES: trim task vectors by magnitude, elect signs, merge the agreeing parts.",
    "https://arxiv.org/abs/2306.01708",
)
_make(
    "dare_ties",
    "random",
    True,
    False,
    True,
    "DARE-TIES: drop task-vector entries at random and rescale, then TIES sign election.",
    "https://arxiv.org/abs/2311.03099",
)
_make(
    "dare_linear",
    "random",
    False,
    False,
    True,
    "DARE: drop task-vector entries at random and rescale, then sum.",
    "https://arxiv.org/abs/2311.03099",
)
_make(
    "breadcrumbs",
    "magnitude_outliers",
    False,
    False,
    False,
    "Model Breadcrumbs: drop the largest outliers and the smallest entries of task vectors.",
    "https://arxiv.org/abs/2312.06795",
)
_make(
    "breadcrumbs_ties",
    "magnitude_outliers",
    True,
    False,
    False,
    "Model Breadcrumbs with TIES sign election.",
    "https://arxiv.org/abs/2312.06795",
)
_make(
    "della",
    "della_magprune",
    True,
    True,
    True,
    "DELLA: drop entries with probability falling with magnitude rank, TIES sign election.",
    "https://arxiv.org/abs/2406.11617",
)
_make(
    "della_linear",
    "della_magprune",
    False,
    False,
    True,
    "DELLA without sign election.",
    "https://arxiv.org/abs/2406.11617",
)
