"""Linear-time magnitude rank selection equals a stable sort, ties included."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.methods import select
from evomerge.merge.methods.select import largest, smallest


def stable_mask(values: torch.Tensor, m: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.argsort(values.double(), descending=descending, stable=True)[:m]] = True
    return mask


@pytest.mark.parametrize("digit", [select.DIGIT, 8, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 30011])
def test_selection_matches_stable_sort(dtype, n, digit, monkeypatch):
    """At any number of bits counted per pass (several passes below 15 bits)."""
    monkeypatch.setattr(select, "DIGIT", digit)
    generator = torch.Generator().manual_seed(n)
    values = (torch.randn(n, generator=generator) * 0.01).to(dtype).abs()
    if n > 10:
        values[::7] = values[3]  # many ties at one value
        values[1::11] = 0.0
    for m in sorted({0, 1, 2, n // 7, n // 3, n // 2, n - 1, n}):
        assert torch.equal(largest(values, m), stable_mask(values, m, True)), (dtype, n, m)
        assert torch.equal(smallest(values, m), stable_mask(values, m, False)), (dtype, n, m)

