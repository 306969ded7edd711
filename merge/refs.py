"""Model references: a local directory, a Hugging Face Hub id with an optional @revision, or a
GGUF file (`merge/gguf.py`: dequantized once into the cache)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from evomerge.merge import gguf
from evomerge.merge.errors import MergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]
# Tokenizer and config files, the model card, and a published merge's recipe
# (evomerge_recipe.yaml, mergekit_config.yml).
SIDE_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md", "*.yaml", "*.yml"]


@dataclass(frozen=True)
class ModelRef:
    path: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if Path(text).exists() or "@" not in text:
            return cls(text)
        path, _, revision = text.rpartition("@")
        return cls(path, revision or None)

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()

    @property
    def hub_id(self) -> str | None:
        """The Hub repository id, for model cards; None for local directories."""
        return None if self.is_local or not _HUB_ID.match(self.path) else self.path


def mark_local(text: str) -> str:
    """A local model path written so that no tool takes it for a Hub id: a relative path that
    exists here, such as `demo-family/base`, becomes `./demo-family/base` (mergekit, like the Hub
    client, reads `org/name` as a repository id)."""
    if text.startswith(("/", "./", "../", "~")) or not Path(text).exists():
        return text
    return f"./{text}"


MODEL_KEYS = ("model", "base_model", "source", "tokenizer_source")  # where recipes name models


def check_reference(text: str) -> ModelRef:
    """A model reference that can be resolved: an existing folder or a Hub id (not fetched);
    the one-line error a merge would give otherwise. Dry runs call it too. For a LoRA reference
    ('base+adapter') both parts are checked and the base's reference returned."""
    from evomerge.merge.lora import split_lora

    base, adapter = split_lora(text)
    if adapter is not None:
        check_reference(adapter)
        return check_reference(base)
    if gguf.is_gguf(text):
        gguf.gguf_file(text)
        return ModelRef(text)
    ref = ModelRef.parse(text)
    path = Path(ref.path)
    if path.exists():
        if not path.is_dir():
            raise MergeError(f"{text}: not a directory (a model is a folder with config.json)")
    elif not _HUB_ID.match(ref.path):
        raise MergeError(f"{text}: no such directory, and not a Hub id of the form 'org/name'")
    return ref


def resolve_model_dir(text: str, *, allow_pickle: bool = False) -> Path:
    """A local directory holding the model (for 'base+adapter', the base's), downloading a Hub
    model if needed."""
    ref = check_reference(text)
    if gguf.is_gguf(ref.path):
        return gguf.dequantized(ref.path)
    if Path(ref.path).exists():
        return Path(ref.path)
    return _download(ref, allow_pickle)


def _download(ref: ModelRef, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = WEIGHT_PATTERNS + SIDE_FILES + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        return Path(snapshot_download(ref.path, revision=ref.revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise MergeError(
            f"{ref}: not in the local Hugging Face cache and the Hub is unreachable or offline "
            f"(HF_HUB_OFFLINE); fetch it beforehand with `hf download {ref.path}` "
            "or give a local path"
        ) from None
    except GatedRepoError:
        raise MergeError(
            f"{ref}: gated on the Hub; accept its terms and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise MergeError(f"{ref}: no such model on the Hub (or it is private: log in)") from None
    except RevisionNotFoundError:
        raise MergeError(f"{ref}: revision {ref.revision!r} not found on the Hub") from None
    except OSError as exc:
        raise MergeError(f"{ref}: cannot download from the Hub: {exc}") from None


IDENTITY_FILES = [*WEIGHT_PATTERNS, *PICKLE_PATTERNS, "config.json", "adapter_config.json"]
SAMPLES, SAMPLE_BYTES = 64, 4096  # read per file: at most 256 KiB beyond a safetensors header


def source_identity(text: str) -> str:
    """A short hash that changes when a source's weights change, read in milliseconds: for each
    weight and config file of its folder (and its adapter's), its name, size, safetensors header
    and 64 blocks of 4 KiB spread over it (a retrained or replaced model differs in nearly every
    block; a file rewritten with the same bytes keeps its identity). A Hub model that is not on
    disk is its reference."""
    from evomerge.merge.lora import split_lora

    base, adapter = split_lora(text)
    digest = hashlib.sha256()
    for part in [base] if adapter is None else [base, adapter]:
        path = gguf.gguf_file(part) if gguf.is_gguf(part) else Path(ModelRef.parse(part).path)
        if not path.exists():
            digest.update(f"{part}\0".encode())
            continue
        files = [path] if path.is_file() else sorted(
            {f for pattern in IDENTITY_FILES for f in path.glob(pattern) if f.is_file()}
        )
        for file in files:
            digest.update(f"{file.name}\0".encode())
            digest.update(_sampled_bytes(file))
    return digest.hexdigest()[:16]


def _sampled_bytes(file: Path) -> bytes:
    size = file.stat().st_size
    with open(file, "rb") as f:
        if size <= SAMPLES * SAMPLE_BYTES:
            return f.read()
        head = b""
        if file.suffix == ".safetensors":
            head = f.read(8)
            head += f.read(min(int.from_bytes(head, "little"), 100_000_000))
        blocks = []
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            blocks.append(f.read(SAMPLE_BYTES))
        return size.to_bytes(8, "little") + head + b"".join(blocks)


def source_bytes(text: str) -> int:
    """The bytes of a source's weight files on disk (its base's for 'base+adapter'; 0 for a Hub
    model not on disk)."""
    from evomerge.merge.lora import split_lora

    base, _ = split_lora(text)
    path = gguf.gguf_file(base) if gguf.is_gguf(base) else Path(ModelRef.parse(base).path)
    if not path.exists():
        return 0
    files = [path] if path.is_file() else [
        f for pattern in (*WEIGHT_PATTERNS, *PICKLE_PATTERNS) for f in path.glob(pattern)
    ]
    return sum(f.stat().st_size for f in files if f.suffix != ".json")
