"""Streaming, sharded safetensors output.

Every output tensor's name, shape and dtype are known from the plan before any is computed,
so each shard's header is written first and tensors are streamed straight after it: memory
holds only the tensors in flight, never a whole shard. Writes happen on a background thread
so computing the next tensor overlaps writing the previous one.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from evomerge.merge.errors import MergeError
from evomerge.merge.weights import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise MergeError(f"--out-shard-size: {text!r} is not a size like 5GB or 500MiB")
    number, prefix, unit = match.groups()
    base = 1024 if unit and unit.upper() == "IB" else 1000
    power = " KMGT".index(prefix.upper() or " ")
    size = int(float(number) * base**power)
    if size <= 0:
        raise MergeError("--out-shard-size: must be positive")
    return size


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _layout(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _header(entries: list[Entry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _DTYPE_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes tensors, in the planned order, into shards; use as a context manager."""

    def __init__(self, out_dir: Path, entries: list[Entry], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = _layout(entries, max_shard_bytes)
        n = len(self.shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(s, e) for s, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        shard, entry = self._order[self._next]
        if name != entry.name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RuntimeError(
                f"writer expected {entry}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._next += 1
        self._queue.put((shard, tensor))

    def _drain(self) -> None:
        handle: BinaryIO | None = None
        current = -1
        try:
            while (item := self._queue.get()) is not None:
                shard, tensor = item
                if shard != current:
                    if handle:
                        handle.close()
                    current = shard
                    handle = open(self.out_dir / self.files[shard], "wb")  # noqa: SIM115
                    handle.write(_header(self.shards[shard]))
                data = tensor.detach().to("cpu").contiguous().reshape(-1)
                handle.write(data.view(torch.uint8).numpy().data)
        except BaseException as exc:  # surfaced on the main thread
            self._fail(exc, current)
            while self._queue.get() is not None:
                pass
        finally:
            if handle:
                try:
                    handle.close()
                except BaseException as exc:  # a buffered write failing at last (disk full)
                    self._fail(exc, current)

    def _fail(self, exc: BaseException, shard: int) -> None:
        """Keep the first error, naming the shard file an OS refusal came from."""
        if self._error is not None:
            return
        if isinstance(exc, OSError) and exc.filename is None and shard >= 0:
            exc = OSError(exc.errno, exc.strerror, str(self.out_dir / self.files[shard]))
        self._error = exc

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} planned tensors")
        if len(self.files) > 1:
            weight_map = {e.name: self.files[s] for s, e in self._order}
            total = sum(e.nbytes for _, e in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._queue.put(None)
            self._thread.join()
