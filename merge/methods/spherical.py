"""Spherical interpolation: SLERP between a base and one model, NuSLERP between two models
(optionally as task vectors from a base)."""

from __future__ import annotations

import torch

from evomerge.merge.methods import BasePolicy, MergeMethod, ParamSpec, Scope, register

# mergekit reduces in pieces of this many elements: one float32 reduction over a whole embedding
# (28M entries in SmolLM2) is off by 0.3% in its dot product, enough to take the linear branch.
CHUNK_ELEMENTS = 1024 * 1024


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Interpolate along the great circle between v0 and v1 (whole tensors as vectors);
    nearly collinear pairs fall back to linear interpolation. Norms and the dot product are
    summed over CHUNK_ELEMENTS pieces, in mergekit 0.1.5's order, so results match it bit
    for bit."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype, device=a.device)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    pieces = [slice(i, i + CHUNK_ELEMENTS) for i in range(0, a.shape[1], CHUNK_ELEMENTS)]

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(x[:, p].to(dtype), dim=1, keepdim=True) for p in pieces]
        n = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(n > eps, n, 1)

    norm_a, norm_b = norm(a), norm(b)
    dots = [
        ((a[:, p].to(dtype) / norm_a) * (b[:, p].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
        for p in pieces
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return (coef_a * a.to(dtype) + coef_b * b.to(dtype)).reshape(v0.shape).to(v0.dtype)


def _slerp(group, shared, per_input, generators):
    base_index = group.base_index
    return slerp(shared["t"], group.tensors[base_index], group.tensors[1 - base_index])


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dim: int = -1,
    eps: float = 1e-8,
    flatten: bool = False,
) -> torch.Tensor:
    shape = v0.shape

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def _nuslerp(group, shared, per_input, generators):
    others = group.non_base
    weights = [p["weight"] for i, p in enumerate(per_input) if i != group.base_index]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if shared["nuslerp_row_wise"] else -1
    flatten = shared["nuslerp_flatten"]
    if group.base_index is None:
        return nuslerp(t, others[0], others[1], dim=dim, flatten=flatten)
    base = group.base
    return base + nuslerp(t, others[0] - base, others[1] - base, dim=dim, flatten=flatten)


register(
    MergeMethod(
        name="slerp",
        params=(ParamSpec("t", float, Scope.SHARED),),
        merge=_slerp,
        base=BasePolicy.REQUIRED,
        min_inputs=2,
        max_inputs=2,
        description="SLERP: spherical interpolation from the base (t=0) to the other model (t=1).",
        reference="https://en.wikipedia.org/wiki/Slerp",
    )
)
register(
    MergeMethod(
        name="nuslerp",
        params=(
            ParamSpec("weight", float, Scope.NON_BASE),
            ParamSpec("nuslerp_row_wise", bool, Scope.SHARED, False),
            ParamSpec("nuslerp_flatten", bool, Scope.SHARED, True),
        ),
        merge=_nuslerp,
        base=BasePolicy.OPTIONAL,
        min_non_base=2,
        max_non_base=2,
        description="NuSLERP: spherical interpolation of two models, or of their task vectors.",
    )
)


def _multislerp(group, shared, per_input, generators):
    """Barycentric interpolation on the hypersphere: project (task vectors, with a base) onto
    the tangent space at their weighted mean direction, average there, map back, rescale by
    the weighted mean norm (mergekit 0.1.5's multislerp, operation for operation)."""
    inputs = group.non_base
    if len(inputs) == 1:
        return inputs[0]
    base = group.base if group.base_index is not None else None
    eps = shared["eps"]
    stacked = torch.stack(inputs)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = [p["weight"] for i, p in enumerate(per_input) if i != group.base_index]
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if shared["normalize_weights"]:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError(
                f"{group.name}: multislerp: the weighted directions cancel out (antipodal task "
                "vectors with balancing weights); change the weights"
            )
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return result + base if base is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result + base if base is not None else result


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float
) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the tensors' directions on the unit sphere,
    by fixed-point iteration, scaled by the weighted mean of their norms."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype)
        for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for alpha, unit in zip(weights, points, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, points, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (
            torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        ).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


def _karcher(group, shared, per_input, generators):
    n = len(group.tensors)
    return karcher_mean(group.tensors, [1.0 / n] * n, shared["max_iter"], shared["tol"])


register(
    MergeMethod(
        name="multislerp",
        params=(
            ParamSpec("weight", float, Scope.NON_BASE),
            ParamSpec("normalize_weights", bool, Scope.SHARED, True),
            ParamSpec("eps", float, Scope.SHARED, 1e-8),
        ),
        merge=_multislerp,
        base=BasePolicy.OPTIONAL,
        min_non_base=1,
        description="Multi-SLERP: weighted interpolation of any number of models on the "
        "hypersphere (of task vectors, with a base).",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)
register(
    MergeMethod(
        name="karcher",
        params=(
            ParamSpec("max_iter", int, Scope.SHARED, 10),
            ParamSpec("tol", float, Scope.SHARED, 1e-5),
        ),
        merge=_karcher,
        description="Karcher mean: the equal-weight Riemannian mean of the models' weights on "
        "the sphere, scaled by their mean norm.",
        reference="https://arxiv.org/abs/2603.04972",
    )
)
