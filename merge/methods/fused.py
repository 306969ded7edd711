"""Fused CPU kernels (fused.c): linear merges, the task-vector combine (with TIES' fast
magnitude selection inside it) and DARE's masks, each in one pass over the entries.

Eager torch runs a merge as a dozen elementwise kernels per entry, each reading and writing
bfloat16 through float32, several times a copy pass each. fused.c does the same steps with the
same roundings in one loop, so its output equals the eager path's bit for bit (tested in
tests/test_fused.py). It is compiled with the machine's C compiler (`$CC`, else `cc`) on first use
into `$EVOMERGE_CACHE/kernels/` (default `~/.cache/evomerge`) and loaded with ctypes; without a
compiler, or with EVOMERGE_FUSED=0, the eager path runs. The range is split over torch's
intra-op thread count (ctypes releases the GIL).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from evomerge.merge.methods import select

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
X86_FLAGS = ("-mprefer-vector-width=512",)  # AVX-512 where there is one: measured faster
MIN_SPLIT = 1 << 18  # entries per thread below which one thread does the whole tensor
MAX_MODELS = 8  # task vectors fused.c takes (its buffers)
_KERNELS = {torch.bfloat16: "combine_bf16", torch.float32: "combine_f32"}
_LINEAR = {torch.bfloat16: "linear_bf16", torch.float32: "linear_f32"}
_DARE = {torch.bfloat16: "dare_mask_bf16", torch.float32: "dare_mask_f32"}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge"
    return Path(root) / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (the eager path runs)."""
    if os.environ.get("EVOMERGE_FUSED", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    flags = FLAGS + (X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else ())
    try:
        source = SOURCE.read_bytes()
    except OSError:  # an install without the source
        return None
    key = hashlib.sha256(
        source + " ".join((compiler, *flags, platform.machine(), _cpu_flags())).encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"fused-{key}.so"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name
                subprocess.run(
                    [compiler, *flags, str(SOURCE), "-o", str(built)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                built.replace(path)  # atomic: a concurrent process sees all of it or none
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name in _KERNELS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
            ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_int, ctypes.c_float,
            ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32),
            ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
        ]  # fmt: skip
    for name in _LINEAR.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.POINTER(ctypes.c_float),
            ctypes.c_int, ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int,
        ]  # fmt: skip
    for name in _DARE.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float,
                       ctypes.c_void_p]  # fmt: skip
    lib.histogram_bf16.restype = None
    lib.histogram_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.nth_equal_bf16.restype = ctypes.c_int64
    lib.nth_equal_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64]
    return lib


def _parts(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // MIN_SPLIT))


def _bounds(numel: int, parts: int) -> list[int]:
    return [numel * p // parts for p in range(parts + 1)]


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process (a forked child has none of its parent's threads)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="evomerge-fused")


def _map(fn, items) -> None:
    items = list(items)
    if len(items) == 1:
        fn(items[0])
        return
    list(_pool(len(items), os.getpid()).map(fn, items))


def _split(numel: int, run) -> None:
    """run(start, stop) over range(numel), split over torch's intra-op threads."""
    bounds = _bounds(numel, _parts(numel))
    _map(lambda p: run(bounds[p], bounds[p + 1]), range(len(bounds) - 1))


def linear(
    tensors: list[torch.Tensor], weights: tuple[float, ...], normalize: bool, total: float,
    out: torch.Tensor,
) -> bool:  # fmt: skip
    """`_linear_into` in fused.c, if it applies (CPU, all bfloat16 or all float32, contiguous);
    False leaves `out` untouched for the eager path."""
    dtype = out.dtype
    if not (
        out.device.type == "cpu"
        and dtype in _LINEAR
        and out.is_contiguous()
        and all(
            t.dtype == dtype and t.is_contiguous() and t.numel() == out.numel() for t in tensors
        )
    ):
        return False
    if library() is None:
        return False
    madd = addcmul_fuses()
    if madd is None:
        return False
    _run_linear(tensors, weights, normalize, total, out, madd)
    return True


def _run_linear(tensors, weights, normalize, total, out, madd: bool) -> None:
    kernel = getattr(library(), _LINEAR[out.dtype])
    pointers = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
    values = (ctypes.c_float * len(weights))(*weights)

    def run(start: int, stop: int) -> None:
        n, size = len(tensors), stop - start
        kernel(pointers, n, values, int(normalize), total, start, size, out.data_ptr(), int(madd))

    _split(out.numel(), run)


@functools.cache
def addcmul_fuses() -> bool | None:
    """Whether torch's float32 addcmul_ on this machine rounds each multiply-add once (fused) or
    twice, found by running both kernels on values where the two differ; None when neither
    matches torch (then linear merges run eagerly). Asked only once the kernels are built."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4099, generator=generator) for _ in range(3)]
    weights = (0.3, -0.7, 1.3)
    expected = torch.zeros(4099)
    for tensor, weight in zip(inputs, weights, strict=True):
        expected.addcmul_(tensor, torch.tensor(weight))
    for madd in (True, False):
        got = torch.empty(4099)
        _run_linear(inputs, weights, False, 1.0, got, madd)
        if torch.equal(got.view(torch.int32), expected.view(torch.int32)):
            return madd
    return None


def selects_in_combine(
    sparsification: str | None, consensus: bool, shared: dict[str, Any], dtype: torch.dtype
) -> bool:
    """TIES' fast magnitude selection on bfloat16 is applied inside the fused combine
    (magnitude_cuts) rather than sparsifying first; the memory plan asks the same."""
    return (
        sparsification == "magnitude"
        and consensus
        and dtype == torch.bfloat16
        and shared.get("selection") == "fast"
        and not shared.get("rescale")
    )


def usable(base: torch.Tensor, deltas: torch.Tensor) -> bool:
    """The combine kernel takes these inputs (into a contiguous output of their dtype)."""
    return (
        base.device.type == "cpu"
        and base.dtype in _KERNELS
        and deltas.dtype == base.dtype
        and base.is_contiguous()
        and deltas.is_contiguous()
        and 0 < deltas.shape[0] <= MAX_MODELS
        and deltas[0].numel() == base.numel()
        and library() is not None
    )


Cuts = tuple[list[int], list[int]]  # per task vector: the cut key, and the index ties stop at
# id(stacked task vectors) -> (their version, per task vector: the magnitude keys present and
# their running counts). A search's resident task vectors do not change between candidates, so
# their histograms are counted once; an entry goes when its tensor does (weakref.finalize), and
# an in-place change (a new version) counts again.
_COUNTS: dict[int, tuple[int, list[tuple[torch.Tensor, torch.Tensor] | None]]] = {}


def _magnitude_counts(deltas: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 15-bit magnitude keys of task vector i that occur, ascending, and the running count
    of entries up to each (select.py's histogram without its empty bins)."""
    entry = _COUNTS.get(id(deltas))
    if entry is None or entry[0] != deltas._version:
        if entry is None:
            weakref.finalize(deltas, _COUNTS.pop, id(deltas), None)
        entry = _COUNTS[id(deltas)] = (deltas._version, [None] * deltas.shape[0])
    if entry[1][i] is None:
        delta, n, lib = deltas[i], deltas[i].numel(), library()
        parts = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(_parts(n))]
        bounds = _bounds(n, len(parts))

        def count(p: int) -> None:
            start, size = bounds[p], bounds[p + 1] - bounds[p]
            lib.histogram_bf16(delta.data_ptr() + 2 * start, size, parts[p].data_ptr())

        _map(count, range(len(parts)))
        counts = sum(parts)
        present = counts.nonzero().squeeze(1)
        entry[1][i] = (present, counts[present].cumsum(0))
    return entry[1][i]



def magnitude_cuts(deltas: torch.Tensor, densities: list[float]) -> Cuts | None:
    """TIES' magnitude selection with `selection: fast` (sparsify.magnitude, select.largest) as
    what fused.c needs to apply it while combining: per task vector, the magnitude key at the
    cut and the index before which entries at the cut are kept. bfloat16 only; None where the
    eager path must sparsify (another dtype, a density of 0 or below, which gives +0 zeros)."""
    if deltas.dtype != torch.bfloat16 or any(d <= 0 for d in densities):
        return None
    lib = library()
    n = deltas[0].numel()
    cut_keys, limits = [], []
    for i, (delta, density) in enumerate(zip(deltas, densities, strict=True)):
        k = max(1, int(density * n))
        if k >= n:
            cut_keys.append(-1)  # every key is above
            limits.append(0)
            continue
        keys, cumulative = _magnitude_counts(deltas, i)
        index, below, ties = select.reaching(cumulative, n - k + 1)
        cut = int(keys[index])
        need = k - (n - below - ties)  # how many entries at the cut are kept, in index order
        cut_keys.append(cut)
        if need == 0:
            limits.append(0)
        elif need == ties:
            limits.append(n)
        else:
            limits.append(lib.nth_equal_bf16(delta.data_ptr(), n, cut, need))
    return cut_keys, limits


def combine(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    shared: dict[str, Any],
    consensus: bool,
    out: torch.Tensor,
    cuts: Cuts | None = None,
) -> bool:
    """`_combine` in fused.c, if it applies (`usable`, a contiguous output of the dtype), after
    the magnitude selection `cuts` when given; False leaves `out` untouched for the eager path."""
    if not (
        usable(base, deltas)
        and out.dtype == weights.dtype == base.dtype
        and out.is_contiguous()
        and out.numel() == base.numel()
        and (cuts is None or (consensus and base.dtype == torch.bfloat16))
    ):
        return False
    models = deltas.shape[0]
    kernel = getattr(library(), _KERNELS[base.dtype])
    values = (ctypes.c_float * models)(*weights.float().tolist())
    keys = limits = None
    if cuts is not None:
        keys = (ctypes.c_int32 * models)(*cuts[0])
        limits = (ctypes.c_int64 * models)(*cuts[1])
    divisor = 1.0
    if shared["normalize"] and not consensus:
        total = weights.sum(dim=0)  # as the eager path rounds it
        divisor = 1.0 if abs(float(total)) < 1e-8 else float(total)
    numel, itemsize = base.numel(), base.element_size()
    lam = float(shared["lambda"])

    def run(start: int, stop: int) -> None:
        offset = start * itemsize
        kernel(
            base.data_ptr() + offset, deltas.data_ptr() + offset, numel, stop - start, models,
            values, int(consensus), int(bool(shared["normalize"])), divisor, int(lam != 1),
            lam, out.data_ptr() + offset, keys, limits, start,
        )  # fmt: skip

    _split(numel, run)
    return True


def dare_masked(
    tensor: torch.Tensor, density: float, generator: torch.Generator
) -> torch.Tensor | None:
    """`tensor * torch.bernoulli(full_like(tensor, density), generator)` (sparsify.bernoulli's
    mask, applied) in fused.c: the same draws from the same fresh generator, without the
    probability and mask tensors. None where it does not apply (not a CPU tensor of bfloat16 or
    float32, a generator already drawn from, or torch's draws on this machine differ from
    fused.c's: checked once)."""
    if not (
        tensor.device.type == "cpu"
        and tensor.dtype in _DARE
        and tensor.is_contiguous()
        and generator.device.type == "cpu"
        and library() is not None
        and bernoulli_matches()
    ):
        return None
    seed = generator.initial_seed()
    if not torch.equal(generator.get_state(), torch.Generator().manual_seed(seed).get_state()):
        return None  # drawn from already: its stream no longer starts at the seed
    return _dare(tensor, density, seed)


def _dare(tensor: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    p = float(torch.tensor(density, dtype=tensor.dtype))  # the probability in the dtype
    masked = torch.empty_like(tensor)
    getattr(library(), _DARE[tensor.dtype])(tensor.data_ptr(), tensor.numel(), seed, p,
                                            masked.data_ptr())  # fmt: skip
    return masked


@functools.cache
def bernoulli_matches() -> bool:
    """Whether torch.bernoulli on this machine draws what fused.c draws (MT19937, 24-bit
    uniforms), on a probe of both dtypes; if not, DARE masks come from torch."""
    for dtype in _DARE:
        values = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(dtype)
        probs = torch.full_like(values, 0.37)
        mask = torch.bernoulli(probs, generator=torch.Generator().manual_seed(2**40 + 123))
        if not torch.equal(_dare(values, 0.37, 2**40 + 123), values * mask):
            return False
    return True
