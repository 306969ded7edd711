"""A model folder's safetensors weights, indexed from their headers before any tensor is read.

`WeightIndex.read(folder, where)` is the one reader of weight files and shard indexes: merges
(`Checkpoint`), `publish` and `reproduce --verify` all index a folder through it, so they accept
and refuse the same folders with the same one-line errors:

- every header passes safetensors' own checks (length, JSON shape, dtypes, shapes, offsets that
  neither overlap nor leave gaps, the file fully covered), read with `safe_open`, not around it;
- a shard index is JSON with a `weight_map` of tensor name -> file; each file it names lies in
  the folder (no absolute paths, no `..`, no symbolic link out of it), exists, and holds exactly
  the tensors the index maps to it;
- without an index, every `*.safetensors` file in the folder counts and no tensor is in two.

The one allowance for links: a Hugging Face cache snapshot (`<repo>/snapshots/<rev>/`) links its
files to `<repo>/blobs/`, which counts as inside.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.merge.errors import MergeError, first_line

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

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


def allowed_roots(folder: Path) -> list[Path]:
    """Where the files of `folder` may really live: in it, or in its Hugging Face cache blobs."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def file_in_folder(folder: Path, name: str, where: str) -> Path:
    """`folder / name` for a file name a model folder's metadata gives, refused (one line) when
    it points outside the folder."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise MergeError(
            f"{where}: names {name!r}, which is outside {folder}; a model folder's files must "
            "lie in it (fix or re-download the folder)"
        )
    path = folder / relative
    real = path.resolve()
    if not any(real == root or root in real.parents for root in allowed_roots(folder)):
        raise MergeError(
            f"{where}: {name} is a link to {real}, outside {folder}; a model folder's files must "
            "lie in it (copy the file in, or re-download the folder)"
        )
    return path


def read_header(path: Path, where: str) -> tuple[dict[str, dict[str, Any]], int]:
    """A safetensors file's tensor entries and the offset where its data starts, after
    safetensors itself has validated the whole header against the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, SafetensorError, ValueError, struct.error) as exc:
        raise MergeError(
            f"{where}: {path.name} is not a valid safetensors file ({first_line(exc)}); "
            "re-download or rebuild it"
        ) from None
    header.pop("__metadata__", None)
    return header, 8 + length


def read_weight_map(index_file: Path, where: str) -> dict[str, str]:
    """The tensor name -> file map of a shard index, or a one-line error."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except OSError as exc:
        raise MergeError(f"{index_file}: cannot read ({first_line(exc)})") from None
    except (ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise MergeError(
            f"{where}: {index_file.name} is not a shard index (JSON with a weight_map of tensor "
            "name -> file); re-download or rebuild it"
        )
    return weight_map


@dataclass
class WeightIndex:
    """Tensor name -> where its bytes are, for every safetensors tensor of a folder."""

    folder: Path
    tensors: dict[str, TensorInfo]
    files: list[Path]  # the weight files, in order
    unindexed: list[Path]  # .safetensors files in the folder that its shard index does not name

    @classmethod
    def read(cls, folder: Path, where: str | None = None) -> WeightIndex:
        where = where or str(folder)
        index_file = folder / INDEX_FILE
        on_disk = sorted(folder.glob("*.safetensors"))
        if not index_file.is_file():
            tensors: dict[str, TensorInfo] = {}
            for file in on_disk:
                file_in_folder(folder, file.name, where)
                for name, info in _entries(file, where).items():
                    if name in tensors:
                        raise MergeError(
                            f"{where}: tensor {name} is in both {tensors[name].file.name} and "
                            f"{file.name}; remove the stray file or add {INDEX_FILE}"
                        )
                    tensors[name] = info
            return cls(folder, tensors, on_disk, [])
        weight_map = read_weight_map(index_file, where)
        shards: dict[str, Path] = {}
        for shard in sorted(set(weight_map.values())):
            path = file_in_folder(folder, shard, f"{where}: {INDEX_FILE}")
            if not path.is_file():
                raise MergeError(
                    f"{where}: shard {shard}, listed in {INDEX_FILE} but not in the folder, "
                    "is missing"
                )
            shards[shard] = path
        tensors = {}
        for shard, path in shards.items():
            for name, info in _entries(path, where).items():
                if weight_map.get(name) != shard:
                    mapped = (
                        f"names {weight_map[name]} for it" if name in weight_map else "lacks it"
                    )
                    raise MergeError(
                        f"{where}: {shard} holds tensor {name} but {INDEX_FILE} {mapped}; "
                        "fix the index or rebuild the folder"
                    )
                tensors[name] = info
        for name, shard in weight_map.items():
            if name not in tensors:
                raise MergeError(
                    f"{where}: {INDEX_FILE} maps tensor {name} to {shard}, which does not hold "
                    "it; fix the index or rebuild the folder"
                )
        named = {path.resolve() for path in shards.values()}
        unindexed = [file for file in on_disk if file.resolve() not in named]
        return cls(folder, tensors, list(shards.values()), unindexed)

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Tensor name -> (file name relative to the folder, shape)."""
        return {
            name: (info.file.relative_to(self.folder).as_posix(), info.shape)
            for name, info in self.tensors.items()
        }


def _entries(file: Path, where: str) -> dict[str, TensorInfo]:
    header, data_start = read_header(file, where)
    entries = {}
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise MergeError(
                f"{where}: {file.name}: tensor {name} has dtype {entry['dtype']}, which "
                f"evomerge does not read ({', '.join(SAFETENSORS_DTYPES)})"
            )
        start = data_start + entry["data_offsets"][0]
        entries[name] = TensorInfo(file, tuple(entry["shape"]), dtype, start)
    return entries
