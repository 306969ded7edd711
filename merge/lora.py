"""LoRA references, `model: base+adapter`, read as mergekit 0.1.5 reads them: the PEFT adapter is
merged into the base first, by PEFT's own rule, and the merge then sees the merged weights.

For each adapted module, PEFT adds `delta = B @ A * scaling` (transposed for `fan_in_fan_out`
and for embeddings) into the weight in place: A and B in float32 (PEFT casts half-precision
adapters up), the sum stored in the weight's dtype; `scaling = lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora`. Modules saved whole (`modules_to_save`) replace the
base's. Here that happens tensor by tensor as the merge reads the base, on the CPU as mergekit
does, with nothing written to disk. Adapters are read from safetensors only, unless pickles are
allowed; DoRA and per-module rank or alpha patterns are refused with a one-line error.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from evomerge.merge.checkpoint import Checkpoint
from evomerge.merge.errors import MergeError
from evomerge.merge.recipe import read_json_object
from evomerge.merge.weights import WeightIndex

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
PAIRS = {
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}


def split_lora(text: str) -> tuple[str, str | None]:
    """'base+adapter' -> (base, adapter); anything else -> (text, None)."""
    if "+" in text and not Path(text).exists():
        base, _, adapter = text.partition("+")
        return base, adapter
    return text, None


class LoraCheckpoint(Checkpoint):
    """A base model folder seen through a PEFT LoRA adapter merged into it."""

    def __init__(self, ref: str, base: Path, adapter: Path, *, allow_pickle: bool = False):
        super().__init__(ref, base, allow_pickle=allow_pickle)
        self.adapter = adapter
        config = read_json_object(adapter / ADAPTER_CONFIG, "the LoRA adapter config")
        self.scaling, self.fan_in_fan_out = _scaling(config, ref)
        self.weights = _adapter_weights(adapter, ref, allow_pickle)
        self.pairs: dict[str, dict[str, str]] = {}  # target tensor -> {"A": key, "B": key}
        self.embeddings: set[str] = set()
        self.replaced: dict[str, str] = {}  # target tensor -> adapter key (modules_to_save)
        for key in self.weights:
            self._claim(key)
        for target, pair in self.pairs.items():
            if set(pair) != {"A", "B"}:
                raise MergeError(f"{ref}: the adapter has lora_{next(iter(pair))} but not both "
                                 f"factors for {target}")  # fmt: skip
        unknown = sorted((set(self.pairs) | set(self.replaced)) - set(self.tensors))
        if unknown:
            raise MergeError(
                f"{ref}: the adapter changes {unknown[0]}, which {base} does not have; is it an "
                "adapter for this base model?"
            )

    def _claim(self, key: str) -> None:
        name = key.removeprefix(PREFIX)
        for suffix, (factor, embedding) in PAIRS.items():
            if name.endswith("." + suffix):
                module = name[: -len(suffix) - 1]
                self.pairs.setdefault(f"{module}.weight", {})[factor] = key
                if embedding:
                    self.embeddings.add(f"{module}.weight")
                return
        if ".lora_" in name:
            raise MergeError(f"{self.ref}: adapter tensor {key} is not a LoRA factor")
        # A module saved whole (modules_to_save), or an adapted embedding's own weights
        # (saved as its base_layer when the vocabulary was resized): they replace the base's.
        self.replaced[name.replace(".base_layer.weight", ".weight")] = key

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if name not in self.pairs and name not in self.replaced:
            return super().read(name, device)
        weight = super().read(name, "cpu")
        if name in self.replaced:
            weight = self.weights[self.replaced[name]].to(weight.dtype)
        if name in self.pairs:
            a = self.weights[self.pairs[name]["A"]].float()
            b = self.weights[self.pairs[name]["B"]].float()
            delta = b @ a
            if self.fan_in_fan_out or name in self.embeddings:
                delta = delta.T
            weight = weight.clone()
            weight += delta * self.scaling  # in place: the sum is stored in the weight's dtype
        return weight.to(device)


def _scaling(config: dict, ref: str) -> tuple[float, bool]:
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{ref}: a {config.get('peft_type')} adapter; only LoRA adapters merge")
    if config.get("use_dora"):
        raise MergeError(f"{ref}: a DoRA adapter; merge it with PEFT first (merge_and_unload)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise MergeError(
            f"{ref}: per-module rank_pattern/alpha_pattern are not supported; merge the adapter "
            "with PEFT first (merge_and_unload)"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
        raise MergeError(f"{ref}: {ADAPTER_CONFIG} needs a positive integer r and a lora_alpha")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scaling, bool(config.get("fan_in_fan_out"))


def _adapter_weights(folder: Path, ref: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if any(folder.glob("*.safetensors")):
        index = WeightIndex.read(folder, ref)  # headers validated before anything is read
        weights: dict[str, torch.Tensor] = {}
        for file in sorted({info.file for info in index.tensors.values()}):
            weights.update(load_file(file))
        return weights
    pickled = folder / "adapter_model.bin"
    if not pickled.is_file():
        raise MergeError(f"{ref}: no adapter_model.safetensors in {folder}")
    if not allow_pickle:
        raise MergeError(
            f"{ref}: the adapter has only pickled weights (adapter_model.bin), which can run "
            "code when loaded; convert it to safetensors or pass --allow-pickle if you trust it"
        )
    return torch.load(pickled, map_location="cpu", weights_only=True)
