"""Exact rank selection by magnitude in linear time.

TIES and breadcrumbs keep entries by magnitude rank. Sorting every tensor (what mergekit does)
dominates a CPU merge; here the cut value is found with histograms of the float bit patterns
(non-negative floats order like their bits), two passes at most. Entries equal to the cut value
are taken in index order, so the choice is the same on every device; mergekit's unstable sort
picks an arbitrary subset of such ties instead, and only there can the results differ.
"""

from __future__ import annotations

import torch

# Bits counted per pass. On a GPU, 8-bit digits (two passes for 16-bit floats) and counting by
# index_add_ instead of bincount measured no faster on an H200 (benchmarks/gpu_check.py
# --profile): there the selection waits for the device a few times per tensor either way.
DIGIT = 16


def _keys(magnitudes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The bit patterns as integers, and how many low bits can be set (the sign bit is 0)."""
    if magnitudes.dtype in (torch.bfloat16, torch.float16):
        return magnitudes.view(torch.int16), 15
    if magnitudes.dtype == torch.float32:
        return magnitudes.view(torch.int32), 31
    raise TypeError(magnitudes.dtype)


def reaching(cumulative: torch.Tensor, m: int) -> tuple[int, int, int]:
    """The first bin whose running count (`cumulative`, on the CPU) reaches m, with the counts
    before and in it."""
    index = int(torch.searchsorted(cumulative, torch.tensor([m])))
    before = int(cumulative[index - 1]) if index else 0
    return index, before, int(cumulative[index]) - before


def _first_reaching(counts: torch.Tensor, m: int) -> tuple[int, int, int]:
    return reaching(counts.cpu().cumsum(0), m)  # one small copy from a GPU, then no more waits


def _mth_smallest_key(keys: torch.Tensor, bits: int, m: int) -> tuple[int, int, int]:
    """The key of the m-th smallest entry, how many keys are smaller, and how many equal it:
    radix selection, the most significant digit first, each pass counting the entries that
    share the digits found so far."""
    key = below = 0
    candidates, shift = keys, bits
    while True:
        width = min(DIGIT, shift)
        shift -= width
        digits = candidates >> shift if shift else candidates
        if shift + width < bits:
            digits = digits & ((1 << width) - 1)
        value, before, ties = _first_reaching(torch.bincount(digits, minlength=1 << width), m)
        key |= value << shift
        below += before
        m -= before
        if not shift:
            return key, below, ties
        candidates = candidates[digits == value]


def _with_ties(strict: torch.Tensor, keys: torch.Tensor, cut: int, need: int, ties: int):
    """Add the first `need` (in index order) of the `ties` entries equal to the cut."""
    if need == ties:
        return strict | (keys == cut)
    if need:
        strict[(keys == cut).nonzero().squeeze(1)[:need]] = True
    return strict


def _by_sort(magnitudes: torch.Tensor, m: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    mask[torch.argsort(magnitudes, descending=descending, stable=True)[:m]] = True
    return mask


def smallest(magnitudes: torch.Tensor, m: int) -> torch.Tensor:
    """Mask of the m smallest entries of a 1-D non-negative tensor (ties: lower index first)."""
    n = magnitudes.numel()
    if m <= 0 or m >= n:
        return torch.full((n,), m >= n, dtype=torch.bool, device=magnitudes.device)
    if magnitudes.dtype == torch.float64:
        return _by_sort(magnitudes, m, descending=False)
    keys, bits = _keys(magnitudes)
    cut, below, ties = _mth_smallest_key(keys, bits, m)
    return _with_ties(keys < cut, keys, cut, m - below, ties)


def largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries of a 1-D non-negative tensor (ties: lower index first)."""
    n = magnitudes.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k >= n, dtype=torch.bool, device=magnitudes.device)
    if magnitudes.dtype == torch.float64:
        return _by_sort(magnitudes, k, descending=True)
    keys, bits = _keys(magnitudes)
    cut, below, ties = _mth_smallest_key(keys, bits, n - k + 1)
    above = n - below - ties
    return _with_ties(keys > cut, keys, cut, k - above, ties)
