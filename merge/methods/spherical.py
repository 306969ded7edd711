"""Spherical interpolation: SLERP between a base and one model, NuSLERP between two models
(optionally as task vectors from a base)."""

from __future__ import annotations

import torch

from evomerge.merge.methods import BasePolicy, MergeMethod, ParamSpec, Scope, register


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Interpolate along the great circle between v0 and v1 (whole tensors as vectors);
    nearly collinear pairs fall back to linear interpolation."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1).to(dtype)
    b = v1.reshape(1, -1).to(dtype)
    tt = torch.tensor([[t]], dtype=dtype, device=a.device)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    norm_a = torch.linalg.vector_norm(torch.linalg.vector_norm(a, dim=1, keepdim=True)[None], dim=0)
    norm_b = torch.linalg.vector_norm(torch.linalg.vector_norm(b, dim=1, keepdim=True)[None], dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


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
