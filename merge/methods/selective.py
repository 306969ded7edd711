"""Methods that choose, entry by entry, how much of one model to take over its base: NearSwap
(take the model where it is close to the base) and Arcee Fusion (take it where it differs in
an important way)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.merge.methods import BasePolicy, MergeMethod, ParamSpec, Scope, register

# Arcee Fusion estimates the importance quartiles from at most this many entries, drawn with
# replacement (mergekit 0.1.5); larger tensors make the merge stochastic.
QUANTILE_SAMPLE = 1_000_000


def _nearswap(group, shared, per_input, generators):
    base, other = group.base, group.non_base[0]
    weight = (shared["t"] / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def _importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|model - base| scaled by the KL divergence of the rows' softmaxes."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _quartiles(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(
            flat.numel(), (QUANTILE_SAMPLE,), device=flat.device, generator=generator
        )
        flat = flat[picks]
    ordered, _ = torch.sort(flat)
    q = torch.tensor([0.25, 0.5, 0.75])
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def _arcee_fusion(group, shared, per_input, generators):
    base, other = group.base, group.non_base[0]
    scores = _importance(other, base)
    q1, median, q3 = _quartiles(scores, generators(0) if generators is not None else None)
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


register(
    MergeMethod(
        name="nearswap",
        params=(ParamSpec("t", float, Scope.SHARED),),
        merge=_nearswap,
        base=BasePolicy.REQUIRED,
        min_inputs=2,
        max_inputs=2,
        description="NearSwap: take the model's value where it lies within t of the base's, "
        "interpolate toward the base elsewhere.",
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    )
)
register(
    MergeMethod(
        name="arcee_fusion",
        params=(),
        merge=_arcee_fusion,
        base=BasePolicy.REQUIRED,
        min_inputs=2,
        max_inputs=2,
        stochastic=True,  # only for tensors above QUANTILE_SAMPLE entries
        description="Arcee Fusion: take the model's changes whose importance (change times "
        "the rows' KL divergence) is an upper outlier.",
        reference="https://arcee.ai",
    )
)
