"""What a config.json says the weights are: the model built on the meta device (no memory, no
download), and the name -> shape of its state dict. Merges check their output against it before
writing; `publish` checks a folder's weights against it."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from evomerge.merge.errors import MergeError, first_line


def meta_model(config: Any, where: str) -> nn.Module:
    """The causal LM a transformers config describes, with meta tensors (no code is trusted)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise MergeError(
            f"{where}: transformers cannot build a causal language model from it "
            f"({first_line(exc)})"
        ) from None


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str], list]:
    """(name -> shape of the model's state dict, names that may be absent because they are tied
    to another weight, patterns of extra names transformers ignores when loading)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    every = dict(model.named_parameters(remove_duplicate=False))
    tied = set(every) - set(dict(model.named_parameters()))  # e.g. lm_head with tied embeddings
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return expected, tied, [re.compile(pattern) for pattern in ignored]


def config_shape_mismatch(
    config: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """The first tensor whose shape differs from what `config` (a config.json's data) describes:
    (name, described, actual); None when all agree, or when transformers does not know the
    architecture (then nothing can be said without its code)."""
    from transformers import AutoConfig

    data = dict(config)
    try:
        built = AutoConfig.for_model(data.pop("model_type"), **data)
        model = meta_model(built, "config.json")
    except Exception:
        return None
    expected, _, _ = expected_tensors(model)
    for name, shape in shapes.items():
        if name in expected and expected[name] != tuple(shape):
            return name, expected[name], tuple(shape)
    return None
