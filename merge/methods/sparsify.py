"""Sparsification of task vectors (TIES, DARE, breadcrumbs, DELLA), as mergekit does it.

Random masks draw from an explicit generator so a seed reproduces a merge bit for bit (on a CPU,
fused.random_sparsified draws the same masks faster). Magnitude trimming has two selections:
"mergekit" sorts the magnitudes exactly as mergekit 0.1.5 does (the same torch calls on the same
values, so among entries of equal magnitude at the cut, common in bf16, it keeps the ones
mergekit keeps on the same torch build); "fast" finds the cut in linear time (select.py) and
keeps equal entries in index order.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.select import largest, smallest

RESCALE_EPS = 1e-7  # below this L1 norm, before or after masking, no rescale


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = RESCALE_EPS):
    """Apply mask; with rescale, restore the L1 norm the tensor had before masking (unless
    either norm is below eps). The factor is chosen on the device, not by asking the host
    (which would wait for a GPU); x * 1 is x, so this is the branch's result bit for bit."""
    return _rescale(tensor, tensor * mask, rescale, eps)


def _rescale(tensor: torch.Tensor, masked: torch.Tensor, rescale: bool, eps: float = RESCALE_EPS):
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    return masked.mul_(torch.where((before < eps) | (after < eps), 1, before / after))


def _sort_keys(tensor: torch.Tensor) -> torch.Tensor:
    """The magnitudes mergekit sorts: float32 on the CPU, the tensor's own dtype elsewhere."""
    w = tensor.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def magnitude(
    tensor: torch.Tensor, density: float, rescale: bool, selection: str = "mergekit"
) -> torch.Tensor:
    """Keep the `density` share of entries with the largest magnitude (TIES)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    if selection == "fast":
        mask = largest(tensor.abs().reshape(-1), k).to(tensor.dtype)
    else:
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        mask[torch.argsort(_sort_keys(tensor), descending=True)[:k]] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, rescale: bool, gamma: float, selection: str = "mergekit"
) -> torch.Tensor:
    """Drop the `gamma` largest entries, then the smallest; keep `density` (Breadcrumbs)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep = int(density * n)
    n_bottom = max(0, n - keep - int(gamma * n))
    if selection == "fast":
        magnitudes = tensor.abs().reshape(-1)
        window = smallest(magnitudes, n_bottom + keep) & ~smallest(magnitudes, n_bottom)
        mask = window.to(tensor.dtype)
    else:
        mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
        order = torch.sort(_sort_keys(tensor), descending=False).indices
        mask[order[n_bottom : n_bottom + keep]] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 kernel on CPU.
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def bernoulli(
    tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE)."""
    if density >= 1:
        return tensor
    work = _work_dtype(tensor)
    values = tensor.to(work)
    probs = torch.full_like(tensor, density, dtype=work)
    masked = values * torch.bernoulli(probs, generator=generator)
    return _rescale(values, masked, rescale).to(tensor.dtype)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    rescale: bool,
    epsilon: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Keep entries with probability rising with their magnitude rank, density ± epsilon (DELLA)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got {density} ± {epsilon}")
    shape = tensor.shape
    work = _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    probs = (density - epsilon) + rank_norms(tensor) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return rescaled(rows.to(work), mask, rescale).to(tensor.dtype).reshape(shape)


def rank_norms(tensor: torch.Tensor) -> torch.Tensor:
    """DELLA's rank_norm: each entry's magnitude rank along dim 1 (a 1-D tensor is one row),
    scaled to [0, 1], in the work dtype. A candidate's density and epsilon do not change it, so
    the in-memory merger keeps it per resident task vector (fused.random_sparsified)."""
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    # mergekit argsorts `order` again to rank each entry; a permutation's argsort is its inverse,
    # which a scatter gives in linear time (the same ranks: a permutation has no ties).
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(_work_dtype(tensor)) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    return ((ranks - low) / (high - low)).clamp(0, 1)


def sparsity_problem(kind: str, params: dict) -> str | None:
    """Why `params` cannot sparsify with `kind` (what the computation would fail on), or None;
    the planner asks before any tensor is read."""
    density = params.get("density")
    if density is None or density >= 1:
        return None
    if kind == "random" and density < 0:
        return f"density must lie in [0, 1] (it is a keep probability), got {density}"
    epsilon = params.get("epsilon")
    outside = epsilon is not None and (density + epsilon >= 1 or density - epsilon <= 0)
    if kind == "della_magprune" and density > 0 and outside:
        return f"density ± epsilon must lie in (0, 1), got {density} ± {epsilon}"
    return None
