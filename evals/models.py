"""Loading what `evomerge eval` scores: a checkpoint folder, or a merge recipe merged in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evomerge.evals.errors import EvalError
from evomerge.merge.compute import resolve_device
from evomerge.merge.errors import MergeError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Candidate:
    model: nn.Module
    tokenizer: Any
    source: str  # what was loaded: 'dir:<path>' or 'recipe:<path>'
    merger: Any = None  # the ResidentMerger of a recipe, for materializing new recipes


def load_candidate(
    path: str | Path, *, device: str = "auto", dtype: str = "auto", allow_pickle: bool = False
) -> Candidate:
    """A model directory via AutoModelForCausalLM, or a recipe merged in memory (no disk).
    Pickled `.bin` weights (which can run code when loaded) need `allow_pickle`."""
    path = Path(path)
    if dtype != "auto" and dtype not in _DTYPES:
        raise EvalError(f"--dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    torch_dtype = None if dtype == "auto" else _DTYPES[dtype]
    if path.is_dir():
        return _load_dir(path, resolve_device(device), torch_dtype, allow_pickle)
    if path.is_file() and path.suffix in {".yaml", ".yml"}:
        return _merge_recipe(path, device, torch_dtype, allow_pickle)
    if path.is_file():
        raise EvalError(f"{path}: not a model folder or a .yaml merge recipe")
    raise EvalError(f"{path}: no such model folder or recipe file")


def _load_dir(
    path: Path, device: torch.device, dtype: torch.dtype | None, allow_pickle: bool
) -> Candidate:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.weights import WeightIndex

    if not (path / "config.json").is_file():
        raise EvalError(f"{path}: not a model folder (no config.json)")
    try:
        safetensors = bool(WeightIndex.read(path).tensors)  # headers and index checked first
    except MergeError as exc:
        raise EvalError(str(exc)) from None
    if not safetensors:
        if not any(path.glob("*.bin")):
            raise EvalError(f"{path}: no *.safetensors weights in the folder")
        if not allow_pickle:
            raise EvalError(
                f"{path}: has only pickled .bin weights, which can run code when loaded; "
                "convert it to safetensors or pass --allow-pickle if you trust it"
            )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or "auto", use_safetensors=safetensors
    )
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Candidate(model, tokenizer, f"dir:{path}")


def _merge_recipe(
    path: Path, device: str, dtype: torch.dtype | None, allow_pickle: bool
) -> Candidate:
    from evomerge.merge.recipe import load_recipe
    from evomerge.merge.resident import ResidentMerger

    try:
        merger = ResidentMerger(load_recipe(path), device=device, allow_pickle=allow_pickle)
        model = merger.build_model(dtype=dtype)
    except MergeError as exc:
        message = str(exc)
        raise EvalError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
    return Candidate(model, merger.tokenizer(), f"recipe:{path}", merger)
