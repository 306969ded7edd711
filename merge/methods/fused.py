"""Fused CPU kernels (fused.c): the task-vector combine in one pass over each entry.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = (
    "-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fPIC", "-shared"
)  # fmt: skip
MIN_SPLIT = 1 << 20  # entries per thread below which one thread does the whole tensor
_KERNELS = {torch.bfloat16: "combine_bf16", torch.float32: "combine_f32"}
_LINEAR = {torch.bfloat16: "linear_bf16", torch.float32: "linear_f32"}


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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join((compiler, *FLAGS, platform.machine(), _cpu_flags())).encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"fused-{key}.so"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name
                subprocess.run(
                    [compiler, *FLAGS, str(SOURCE), "-o", str(built)],
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
            ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
        ]  # fmt: skip
    for name in _LINEAR.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.POINTER(ctypes.c_float),
            ctypes.c_int, ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int,
        ]  # fmt: skip
    lib.max_models.restype = ctypes.c_int
    return lib


def _split(numel: int, run) -> None:
    """run(start, stop) over range(numel), split over torch's intra-op threads."""
    parts = max(1, min(torch.get_num_threads(), numel // MIN_SPLIT))
    if parts == 1:
        run(0, numel)
        return
    bounds = [numel * p // parts for p in range(parts + 1)]
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(run, bounds[:-1], bounds[1:]))


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
    twice, found by running both kernels on values where the two differ; None when the kernels
    are not built or neither matches torch (then linear merges run eagerly)."""
    if library() is None:
        return None
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


def combine(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    shared: dict[str, Any],
    consensus: bool,
    out: torch.Tensor,
) -> bool:
    """`_combine` in fused.c, if it applies (CPU, bfloat16 or float32, contiguous, at most 8
    task vectors) and the kernels are built; False leaves `out` untouched for the eager path."""
    dtype = base.dtype
    models = deltas.shape[0]
    if not (
        base.device.type == "cpu"
        and dtype in _KERNELS
        and deltas.dtype == out.dtype == weights.dtype == dtype
        and base.is_contiguous()
        and deltas.is_contiguous()
        and out.is_contiguous()
        and models > 0
        and base.numel() == out.numel() == deltas[0].numel()
    ):
        return False
    lib = library()
    if lib is None or models > lib.max_models():
        return False
    kernel = getattr(lib, _KERNELS[dtype])
    values = (ctypes.c_float * models)(*weights.float().tolist())
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
            lam, out.data_ptr() + offset,
        )  # fmt: skip

    _split(numel, run)
    return True
