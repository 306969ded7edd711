"""Elementwise merge math a span at a time.

A merge of a few inputs is a handful of elementwise steps per output entry. Run over whole
tensors on a CPU, every step reads and writes a full-size temporary in main memory (and a fresh
allocation faults in every page); run over spans of CHUNK entries into reused buffers, the
temporaries stay in cache and memory traffic is the inputs read once and the output written
once. A GPU is the other way round: each step is a kernel launch, and short spans make a merge
thousands of launches of microseconds each; there spans are DEVICE_SPAN entries (most tensors
whole), which bounds the buffers of the largest ones (an embedding). Each step is the same torch
kernel on the same values, so the result is bit for bit the whole-tensor one at any span length.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

CHUNK = 1 << 16  # entries per span: a few float32 buffers of this size fit a core's L2 cache
# 16-bit task-vector sums are bound by their kernels' arithmetic, not by memory: there, longer
# spans (fewer calls) measured faster (benchmarks/materialize_speed.py).
LONG = 16
DEVICE_SPAN = 1 << 24  # entries per span on a GPU (64 MiB of float32), whatever the scale


def _step(scale: int, device: torch.device | str) -> int:
    return CHUNK * scale if torch.device(device).type == "cpu" else DEVICE_SPAN


def span_size(numel: int, scale: int = 1, device: torch.device | str = "cpu") -> int:
    """The buffer length a span needs for a tensor of `numel` entries on `device`."""
    return min(_step(scale, device), numel)


def spans(
    numel: int, scale: int = 1, device: torch.device | str = "cpu"
) -> Iterator[tuple[int, int]]:
    """(start, stop) of each span covering range(numel) on `device`."""
    step = _step(scale, device)
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


@functools.lru_cache(maxsize=256)
def constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of merge parameters (weights), made once per device. A GPU tensor made
    from a Python list is a copy from pageable memory, which waits for the device to finish
    what it was given: made per tensor, that wait serializes every merge step with the host.
    Callers must not modify it."""
    return torch.tensor(values, dtype=dtype, device=device)
