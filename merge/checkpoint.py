"""Lazy, tensor-by-tensor access to a model folder's weights (sharded or single-file)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge.merge.errors import MergeError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0
    """Where the tensor's bytes start in a safetensors file."""


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header's tensor entries and the file offset where tensor data starts."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _pread_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with plain reads: memory holds it alone, not a mapped file."""
    nbytes = info.dtype.itemsize
    for d in info.shape:
        nbytes *= d
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], info.offset + done)
        if got <= 0:
            raise MergeError(f"{info.file}: truncated safetensors file")
        done += got
    return buffer.view(info.dtype).reshape(info.shape)


class Checkpoint:
    """One model folder: its config and a name -> TensorInfo index, nothing loaded eagerly."""

    def __init__(self, ref: str, path: Path, *, allow_pickle: bool = False):
        self.ref = ref
        self.path = path
        self.allow_pickle = allow_pickle
        if not (path / "config.json").is_file():
            raise MergeError(f"{ref}: no config.json in {path} (not a transformers model folder)")
        self.config: dict[str, Any] = json.loads((path / "config.json").read_text())
        self._handles: dict[tuple[Path, str], Any] = {}
        self._fds: dict[Path, int] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors = self._index()

    def _index(self) -> dict[str, TensorInfo]:
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return self._index_safetensors(files)
        pickled = sorted(self.path.glob("*.bin"))
        if not pickled:
            raise MergeError(f"{self.ref}: no *.safetensors weights in {self.path}")
        if not self.allow_pickle:
            raise MergeError(
                f"{self.ref}: has only pickled .bin weights, which can run code when loaded; "
                "convert it to safetensors or pass --allow-pickle if you trust it"
            )
        index: dict[str, TensorInfo] = {}
        for file in pickled:
            for name, tensor in self._load_pickled(file).items():
                index[name] = TensorInfo(file, tuple(tensor.shape), tensor.dtype)
        return index

    def _index_safetensors(self, files: list[Path]) -> dict[str, TensorInfo]:
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise MergeError(
                    f"{self.ref}: shard {missing[0]} listed in {index_file.name} is missing"
                )
            files = sorted({self.path / f for f in weight_map.values()})
        index: dict[str, TensorInfo] = {}
        for file in files:
            try:
                header, data_start = read_safetensors_header(file)
            except (OSError, ValueError, struct.error) as exc:
                raise MergeError(
                    f"{self.ref}: {file.name} is not a valid safetensors file ({exc})"
                ) from None
            for name, entry in header.items():
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise MergeError(f"{self.ref}: {name} has unsupported dtype {entry['dtype']}")
                start = data_start + entry["data_offsets"][0]
                index[name] = TensorInfo(file, tuple(entry["shape"]), dtype, start)
        return index

    def _load_pickled(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            self._pickled[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return self._pickled[file]

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        info = self.tensors[name]
        if info.file.suffix == ".bin":
            return self._load_pickled(info.file)[name].to(device)
        if torch.device(device).type == "cpu":
            if info.file not in self._fds:
                self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            return _pread_tensor(self._fds[info.file], info)
        key = (info.file, str(device))
        handle = self._handles.get(key)
        if handle is None:
            handle = self._handles[key] = safe_open(
                str(info.file), framework="pt", device=str(device)
            )
        return handle.get_tensor(name)

    @cached_property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config") or self.config

    @property
    def num_layers(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.text_config:
                return int(self.text_config[key])
        raise MergeError(f"{self.ref}: config.json has no num_hidden_layers")

    @property
    def vocab_size(self) -> int | None:
        return self.text_config.get("vocab_size")

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()
        self._pickled.clear()
