"""Elementwise merge math a cache-sized span at a time.

A merge of a few inputs is a handful of elementwise steps per output entry. Run over whole
tensors, every step reads and writes a full-size temporary in main memory (and a fresh
allocation faults in every page); run over spans of CHUNK entries into reused buffers, the
temporaries stay in cache and memory traffic is the inputs read once and the output written
once. Each step is the same torch kernel on the same values, so the result is bit for bit the
whole-tensor one.
"""

from __future__ import annotations

from collections.abc import Iterator

CHUNK = 1 << 16  # entries per span: a few float32 buffers of this size fit a core's L2 cache
# 16-bit task-vector sums are bound by their kernels' arithmetic, not by memory: there, longer
# spans (fewer calls) measured faster (benchmarks/materialize_speed.py).
LONG = 16


def span_size(numel: int, scale: int = 1) -> int:
    """The buffer length a span needs for a tensor of `numel` entries."""
    return min(CHUNK * scale, numel)


def spans(numel: int, scale: int = 1) -> Iterator[tuple[int, int]]:
    """(start, stop) of each span of CHUNK * scale entries covering range(numel)."""
    step = CHUNK * scale
    for start in range(0, numel, step):
        yield start, min(start + step, numel)
