"""Lazy, tensor-by-tensor access to a model folder's weights (sharded or single-file),
indexed by `weights.WeightIndex`."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge.merge.errors import MergeError
from evomerge.merge.recipe import read_json_object
from evomerge.merge.weights import TensorInfo, WeightIndex


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
        self.config: dict[str, Any] = read_json_object(path / "config.json", "the model config")
        self._handles: dict[tuple[Path, str], Any] = {}
        self._fds: dict[Path, int] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors = self._index()

    def _index(self) -> dict[str, TensorInfo]:
        if any(self.path.glob("*.safetensors")):
            return WeightIndex.read(self.path, self.ref).tensors
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
                value = self.text_config[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise MergeError(
                        f"{self.path / 'config.json'}: {key} is {value!r}, not a positive whole "
                        "number; fix the config"
                    )
                return value
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
