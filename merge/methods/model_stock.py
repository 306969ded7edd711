"""Model Stock: interpolate between the base and the average of fine-tunes, with the ratio
derived from the angle between their task vectors."""

from __future__ import annotations

import torch

from evomerge.merge.methods import BasePolicy, MergeMethod, ParamSpec, Scope, register


def _model_stock(group, shared, per_input, generators):
    w0 = group.base
    ws = group.non_base
    shape = w0.shape
    if shared["filter_wise"]:
        if w0.dim() == 1:
            w0 = w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    # No finite estimate at the singularity: keep the base there.
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


register(
    MergeMethod(
        name="model_stock",
        params=(ParamSpec("filter_wise", bool, Scope.SHARED, False),),
        merge=_model_stock,
        base=BasePolicy.REQUIRED,
        min_inputs=3,
        description="Model Stock: base-to-average interpolation set by task-vector geometry.",
        reference="https://arxiv.org/abs/2403.19522",
    )
)
