"""Fused CPU kernels (fused.c): linear merges, the task-vector combine (with TIES' fast
magnitude selection inside it) and DARE's and DELLA's masks, each in one pass over the entries.

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
import math
import os
import platform
import struct
import subprocess
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from evomerge.merge.methods import select, sparsify

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
X86_FLAGS = ("-mprefer-vector-width=512",)  # AVX-512 where there is one: measured faster
MIN_SPLIT = 1 << 18  # entries per thread below which one thread does the whole tensor
MAX_MODELS = 8  # task vectors fused.c takes (its buffers)
_KERNELS = {torch.bfloat16: "combine_bf16", torch.float32: "combine_f32"}
_LINEAR = {torch.bfloat16: "linear_bf16", torch.float32: "linear_f32"}
_MASK = {torch.bfloat16: "random_mask_bf16", torch.float32: "random_mask_f32"}


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
            ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.POINTER(ctypes.c_float),
        ]  # fmt: skip
    for name in _LINEAR.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.POINTER(ctypes.c_float),
            ctypes.c_int, ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int,
        ]  # fmt: skip
    for name in _MASK.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p,
            ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ]  # fmt: skip
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


def _map(fn, items, workers: int | None = None) -> None:
    """fn over items, on `workers` threads (default one per item)."""
    items = list(items)
    workers = len(items) if workers is None else min(workers, len(items))
    if workers <= 1:
        for item in items:
            fn(item)
        return
    list(_pool(workers, os.getpid()).map(fn, items))


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
        and deltas.numel() == deltas.shape[0] * base.numel()
        and library() is not None
    )


Cuts = tuple[list[int], list[int]]  # per task vector: the cut key, and the index ties stop at
# id(stacked task vectors) -> (their version, what was derived from them: {(what, i): value}).
# A search's resident task vectors do not change between candidates, so what a candidate's
# parameters do not change is derived once: TIES' magnitude counts, DELLA's rank norms, the L1
# norms DARE and DELLA rescale to. An entry goes when its tensor does (weakref.finalize), and an
# in-place change (a new version) derives again.
_RESIDENT: dict[int, tuple[int, dict[tuple[str, int], Any]]] = {}


def _resident(deltas: torch.Tensor, what: str, i: int, make):
    entry = _RESIDENT.get(id(deltas))
    if entry is None or entry[0] != deltas._version:
        if entry is None:
            weakref.finalize(deltas, _RESIDENT.pop, id(deltas), None)
        entry = _RESIDENT[id(deltas)] = (deltas._version, {})
    if (what, i) not in entry[1]:
        entry[1][what, i] = make()
    return entry[1][what, i]


def _magnitude_counts(deltas: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 15-bit magnitude keys of task vector i that occur, ascending, and the running count
    of entries up to each (select.py's histogram without its empty bins)."""

    def count() -> tuple[torch.Tensor, torch.Tensor]:
        delta, n, lib = deltas[i], deltas[i].numel(), library()
        parts = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(_parts(n))]
        bounds = _bounds(n, len(parts))

        def run(p: int) -> None:
            start, size = bounds[p], bounds[p + 1] - bounds[p]
            lib.histogram_bf16(delta.data_ptr() + 2 * start, size, parts[p].data_ptr())

        _map(run, range(len(parts)))
        counts = sum(parts)
        present = counts.nonzero().squeeze(1)
        return present, counts[present].cumsum(0)

    return _resident(deltas, "counts", i, count)


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
    scales: list[float] | None = None,
) -> bool:
    """`_combine` in fused.c, if it applies (`usable`, a contiguous output of the dtype), after
    the magnitude selection `cuts` when given, each task vector first multiplied in the dtype
    by its rescale factor in `scales` when given; False leaves `out` untouched."""
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
    values = (ctypes.c_float * models)(*weights.tolist())  # exact in float
    keys = limits = factors = None
    if scales is not None:
        factors = (ctypes.c_float * models)(*scales)
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
            lam, out.data_ptr() + offset, keys, limits, start, factors,
        )  # fmt: skip

    _split(numel, run)
    return True


GRAIN_SIZE = 32768  # torch's at::internal::GRAIN_SIZE: a sum this long or longer is split
TORCH_SUM_SLACK = 64  # roundings besides the cascade's levels (loads, tails, lanes, partials)
LANE_SUM_DEPTH = 624 // 16 + 31  # fused.c's lane_sum: roundings a kept magnitude passes through


def random_sparsified(
    deltas: torch.Tensor,
    kind: str,
    params: list[dict[str, Any]],
    generators,
    rescale: bool,
    *,
    probe: bool = False,
) -> tuple[torch.Tensor, list[float] | None] | None:
    """sparsify.bernoulli (DARE) or sparsify.della_magprune (DELLA) of every task vector, the
    masks drawn by fused.c, into one stacked tensor; with rescale, each one's factor, which
    `combine` applies (as sparsify._rescale does, in the dtype). The same bits as the eager
    path: torch.bernoulli's draws from the same fresh generators (checked once per process:
    `bernoulli_matches`), and the L1 norms torch's sum gives (`_l1_after`). What a candidate does
    not change is kept per resident task vector: DELLA's rank norms, the norms before masking.
    None where the eager path must run (not a CPU tensor of bfloat16 or float32, a generator
    already drawn from, a parameter the eager path refuses)."""
    dtype, n = deltas.dtype, deltas[0].numel()
    della = kind == "della_magprune"
    if not (
        deltas.device.type == "cpu"
        and dtype in _MASK
        and deltas.is_contiguous()
        and generators is not None
        and library() is not None
        and (probe or bernoulli_matches())
    ):
        return None
    if della and row_length(deltas.shape[1:]) < 2:
        return None  # rows of one entry: the eager path's 0 / 0 (prepare skips them too)
    draws = []  # (i, seed, p, low, epsilon) of the task vectors masked
    for i, p in enumerate(params):
        density, epsilon = p["density"], p.get("epsilon", 0.0)
        if density >= 1 or (della and density <= 0):
            continue
        if density < 0 or (della and (density + epsilon >= 1 or density - epsilon <= 0)):
            return None  # the eager path says why
        seed = _seed(generators, i)
        if seed is None:
            return None
        # torch.full_like(x, density) and `(density - epsilon) + x` round their scalar to the
        # dtype (through float32), `x * epsilon` to float32
        probability, low = _in_dtype(density, dtype), _in_dtype(density - epsilon, dtype)
        draws.append((i, seed, probability, low, epsilon))
    sparse = _scratch(deltas)
    scales = [1.0] * len(params)
    masked = {i for i, *_ in draws}
    for i, p in enumerate(params):
        if i not in masked:
            if della and p["density"] <= 0:
                sparse[i].zero_()
            else:
                sparse[i].copy_(deltas[i])
    chunk, chunks = _sum_chunks(n)
    sums = (ctypes.c_double * (len(params) * chunks))()
    kernel = getattr(library(), _MASK[dtype])
    norms = {i: _rank_norms(deltas, i) for i, *_ in draws} if della else {}
    stride = n * deltas.element_size()
    source, target = deltas.data_ptr(), sparse.data_ptr()

    def draw(item) -> None:
        i, seed, probability, low, epsilon = item
        limit = min(max(math.ceil(probability * 2**24), 0), 2**24)  # keep iff draw < limit
        kernel(
            source + i * stride, n, seed, limit,
            norms[i].data_ptr() if della else None, low, epsilon, target + i * stride, chunk,
            ctypes.addressof(sums) + i * chunks * ctypes.sizeof(ctypes.c_double),
        )  # fmt: skip

    _map(draw, draws, torch.get_num_threads())
    if not rescale:
        return sparse, None
    for i, *_ in draws:
        before = _resident(deltas, "l1", i, lambda i=i: deltas[i].abs().sum().item())
        mine = sums[i * chunks : (i + 1) * chunks]
        after = _l1_after(mine, n, chunk) if dtype == torch.bfloat16 else None
        if after is None:
            after = sparse[i].abs().sum().item()  # torch's own, where it cannot be vouched for
        if not (before < sparsify.RESCALE_EPS or after < sparsify.RESCALE_EPS):
            scales[i] = _in_dtype(before / after, dtype)  # a float32 division, then the dtype's
    return sparse, scales


_SCRATCH: list[torch.Tensor] = []  # the buffer sparsified task vectors are drawn into
_VIEWS: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}  # views of it, by shape


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped as `like` in one buffer kept across calls (grown to the largest asked):
    fresh memory for each candidate's largest tensors would be faulted in and zeroed by the
    kernel every time, which costs about as much as drawing the masks."""
    key = (like.dtype, tuple(like.shape))
    view = _VIEWS.get(key)
    if view is not None:
        return view
    nbytes = like.numel() * like.element_size()
    if not _SCRATCH or _SCRATCH[0].numel() < nbytes:
        release_scratch()  # before allocating: never both at once
        _SCRATCH.append(torch.empty(nbytes, dtype=torch.uint8))
    view = _VIEWS[key] = _SCRATCH[0][:nbytes].view(like.dtype).view(like.shape)
    return view


def release_scratch() -> None:
    """Drop the buffer sparsified task vectors are drawn into (the next merge allocates it)."""
    _SCRATCH.clear()
    _VIEWS.clear()


RANK_ROWS = 1 << 16  # entries whose ranks are computed at once: bounds rank_norms' temporaries


def _rank_norms(deltas: torch.Tensor, i: int) -> torch.Tensor:
    """sparsify.rank_norms of task vector i, kept while the task vectors are (a row's ranks do
    not depend on other rows, so they are computed a few rows at a time)."""

    def make() -> torch.Tensor:
        delta = deltas[i]
        if delta.dim() < 2:
            return sparsify.rank_norms(delta).reshape(delta.shape)
        norms = torch.empty(delta.shape, dtype=delta.dtype)
        step = max(1, RANK_ROWS // max(1, delta[0].numel()))
        for start in range(0, delta.shape[0], step):
            norms[start : start + step] = sparsify.rank_norms(delta[start : start + step])
        return norms

    return _resident(deltas, "norms", i, make)


def draws_masks(kind: str | None, dtype: torch.dtype, device: torch.device) -> bool:
    """fused.c draws this sparsification's masks (random_sparsified), as the memory plan asks."""
    return (
        kind in ("random", "della_magprune")
        and device.type == "cpu"
        and dtype in _MASK
        and library() is not None
        and bernoulli_matches()
    )


def row_length(shape) -> int:
    """The length of the rows DELLA ranks a tensor of this shape in (dim 1; a 1-D tensor is one
    row; a scalar, a row of one)."""
    return shape[1] if len(shape) > 1 else shape[0] if len(shape) == 1 else 1


def keeps_rank_norms(kind: str | None, shape, dtype: torch.dtype, device) -> bool:
    """random_sparsified keeps DELLA's rank norms beside task vectors of this shape (not for rows
    of one entry, which the eager path merges), as prepare and the memory plan ask."""
    return (
        kind == "della_magprune"
        and row_length(shape) >= 2
        and draws_masks(kind, dtype, torch.device(device))
    )


def prepare(deltas: torch.Tensor, kind: str | None) -> None:
    """Derive now what random_sparsified keeps per resident task vector and would otherwise
    derive on the first candidate: DELLA's rank norms (as large as the task vectors)."""
    if keeps_rank_norms(kind, deltas.shape[1:], deltas.dtype, deltas.device):
        for i in range(deltas.shape[0]):
            _rank_norms(deltas, i)


def derived_bytes(deltas: torch.Tensor) -> int:
    """Bytes kept beside these task vectors: DELLA's rank norms (made when the merger loads; the
    memory plan counts them) and TIES' magnitude counts (made at the first candidate, at most
    512 KiB a task vector, 5.9 MiB on the real family's 514 MiB; the plan does not count them)."""
    entry = _RESIDENT.get(id(deltas))
    if entry is None or entry[0] != deltas._version:
        return 0
    kept = [v for (what, _), v in entry[1].items() if what in ("norms", "counts")]
    tensors = [t for v in kept for t in (v if isinstance(v, tuple) else (v,))]
    return sum(t.numel() * t.element_size() for t in tensors)


def _seed(generators, i: int) -> int | None:
    """The seed task vector i's CPU generator starts from: told by compute.generators_for, else
    that of the generator, if nothing was drawn from it yet."""
    device = getattr(generators, "device", None)
    if hasattr(generators, "seed") and device is not None and torch.device(device).type == "cpu":
        return generators.seed(i)
    generator = generators(i)
    if generator.device.type != "cpu":
        return None
    seed = generator.initial_seed()
    if not torch.equal(generator.get_state(), torch.Generator().manual_seed(seed).get_state()):
        return None
    return seed


def _sum_chunks(n: int) -> tuple[int, int]:
    """How torch's sum of n entries splits them (TensorIterator's two-pass reduction over
    at::parallel_for): the chunk length and the number of partial sums."""
    threads = torch.get_num_threads()
    if threads == 1 or n < GRAIN_SIZE:
        return max(n, 1), 1
    parts = min(threads, -(-n // GRAIN_SIZE))
    chunk = -(-n // parts)
    return chunk, threads


def bfloat16(x: float) -> float:
    """x rounded to the nearest bfloat16 (ties to even), for finite normal x."""
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * 256), exponent - 8)


def _float32(x: float) -> float:
    """x rounded to float32 (double rounding through float64 is exact for one +, -, *, /)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _in_dtype(x: float, dtype: torch.dtype) -> float:
    """x as torch rounds a Python float into a float32 or bfloat16 tensor (through float32)."""
    x = _float32(x)
    if dtype != torch.bfloat16 or x == 0 or not math.isfinite(x):
        return x
    if 2.0**-126 <= abs(x) < 2.0**127:
        return bfloat16(x)
    return float(torch.tensor(x).to(dtype))  # subnormal or near overflow: torch's own rounding


@functools.cache
def _cascade_depth(m: int) -> int:
    """At most how many roundings an entry passes through in torch's cascade sum of m bfloat16
    entries (SumKernel.cpp: load pairs, 4 accumulators, 4 levels of `level_step`), for every
    vector width torch has (8, 16 or 32 bfloat16)."""
    depth = 0
    for width in (8, 16, 32):
        rows = m // width // 4
        step = 1 << max(4, (max(rows, 1) - 1).bit_length() // 4)
        depth = max(depth, 4 * step + -(-rows // step**3) + 2 * width)
    return depth + TORCH_SUM_SLACK


def _l1_after(sums: list[float], n: int, chunk: int) -> float | None:
    """What torch's `masked.abs().sum()` gives for bfloat16 `masked`, from fused.c's per-chunk
    sums of the kept magnitudes, or None where that cannot be vouched for. torch sums a chunk in
    float32 in its own order and rounds it to bfloat16; each chunk's exact sum differs from its
    float32 sum, and from fused.c's, by less than a bound from the roundings it passed through,
    so when no bfloat16 rounding boundary lies within that bound of fused.c's sum, both round to
    the same bfloat16. The chunks' bfloat16 sums are then added as torch adds them (float32, its
    scalar row_sum order for fewer than 16 partials)."""
    partials = []
    for t, total in enumerate(sums):
        m = max(0, min(chunk, n - t * chunk))
        if total == 0:
            partials.append(0.0)
            continue
        bound = (_cascade_depth(m) + LANE_SUM_DEPTH + 2) * 2.0**-24 + m * 2.0**-52
        if not 2.0**-120 < total < 2.0**120:
            return None
        low, high = total * (1 - bound), total * (1 + bound)
        if bfloat16(low) != bfloat16(high):
            return None
        partials.append(bfloat16(total))
    if len(partials) == 1:
        return partials[0]
    if len(partials) >= 16:
        return None  # torch sums the partials vectorized: another order
    return bfloat16(_row_sum(partials))


def _row_sum(values: list[float]) -> float:
    """SumKernel.cpp's scalar row_sum of fewer than 64 float32 values: four running sums over
    rows of four, the rest into the first, then the four added."""
    rows = len(values) // 4
    acc = [0.0] * 4
    for r in range(rows):
        for k in range(4):
            acc[k] = _float32(acc[k] + values[4 * r + k])
    for value in values[4 * rows :]:
        acc[0] = _float32(acc[0] + value)
    for k in range(1, 4):
        acc[0] = _float32(acc[0] + acc[k])
    return acc[0]


@functools.cache
def bernoulli_matches() -> bool:
    """Whether torch.bernoulli on this machine draws what fused.c draws (MT19937, 24-bit
    uniforms) and DELLA's probabilities are the eager path's, on a probe of both dtypes; if
    not, masks come from torch."""
    generator = torch.Generator().manual_seed(1)
    for dtype in _MASK:
        values = torch.randn((7, 700), generator=generator).to(dtype)
        stacked = values.unsqueeze(0)
        for kind, params in (("random", {"density": 0.37}),
                             ("della_magprune", {"density": 0.37, "epsilon": 0.11})):  # fmt: skip
            seed = 2**40 + 123
            fresh = lambda i, s=seed: torch.Generator().manual_seed(s)  # noqa: E731
            if kind == "random":
                expected = sparsify.bernoulli(values, 0.37, False, fresh(0))
            else:
                expected = sparsify.della_magprune(values, 0.37, False, 0.11, fresh(0))
            got = random_sparsified(stacked, kind, [params], fresh, False, probe=True)
            if got is None or not torch.equal(got[0][0], expected):
                return False
    return True
