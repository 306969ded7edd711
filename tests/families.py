"""Untrained tiny model families for merge-math tests.

`build_tiny_family` writes a base checkpoint and experts that are the base plus seeded Gaussian
task vectors. The task vectors share a common direction whose sign alternates between experts, so
TIES sign election and magnitude pruning change the result; their scales differ per expert. With
`extra_vocab=True` each expert also gets a few tokens of its own (appended after the base
vocabulary, with matching embedding and lm_head rows), for `tokenizer_source: union` tests.
The same seed gives byte-identical files; a family of three checkpoints takes about 0.15 s.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from build_family import make_char_tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
)

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz +-=*?.,:")
# Distinct per expert, so the union of the vocabularies grows with every expert.
EXTRA_CHARS = "αβγδεζηθικλμνξοπρστυφχψω"
EXTRA_PER_EXPERT = 3

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


@dataclass
class TinyFamily:
    base: Path
    experts: list[Path]
    arch: str


def _config(arch: str, vocab_size: int):
    config_cls, _ = ARCHS[arch]
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )


def _base_weights(names_shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in names_shapes.items():
        noise = torch.randn(shape, generator=gen)
        # Norm weights sit around 1 like trained ones; everything else is small.
        weights[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise
    return weights


def _task_vector(
    names_shapes: dict[str, torch.Size], seed: int, index: int
) -> dict[str, torch.Tensor]:
    common = torch.Generator().manual_seed(seed * 7919 + 1)
    own = torch.Generator().manual_seed(seed * 7919 + 100 + index)
    sign = 1.0 if index % 2 else -1.0
    scale = 0.02 * (1.0 + 0.5 * (index - 1))
    delta = {}
    for name, shape in names_shapes.items():
        shared = torch.randn(shape, generator=common)
        delta[name] = scale * (sign * shared + torch.randn(shape, generator=own))
    return delta


def _save(arch: str, weights: dict[str, torch.Tensor], tokenizer, folder: Path) -> None:
    _, model_cls = ARCHS[arch]
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    with torch.random.fork_rng(devices=[]):  # model init must not touch the caller's RNG
        model: PreTrainedModel = model_cls(_config(arch, vocab_size))
    model.load_state_dict(weights, strict=True)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _with_extra_rows(
    weights: dict[str, torch.Tensor], n_rows: int, seed: int, index: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 7919 + 500 + index)
    out = dict(weights)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = 0.08 * torch.randn((n_rows, weights[name].shape[1]), generator=gen)
        out[name] = torch.cat([weights[name], rows])
    return out


def build_tiny_family(
    root: Path,
    arch: str = "llama",
    n_experts: int = 2,
    seed: int = 0,
    extra_vocab: bool = False,
) -> TinyFamily:
    """Write `root/base` and `root/expert_1..n` as Hugging Face checkpoint folders."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if extra_vocab and n_experts * EXTRA_PER_EXPERT > len(EXTRA_CHARS):
        raise ValueError(f"extra_vocab supports at most {len(EXTRA_CHARS) // EXTRA_PER_EXPERT}")
    root = Path(root)
    base_tokenizer = make_char_tokenizer(CHARS)
    shapes = _shapes(arch, len(base_tokenizer))
    base = _base_weights(shapes, seed)
    _save(arch, base, base_tokenizer, root / "base")
    experts = []
    for index in range(1, n_experts + 1):
        delta = _task_vector(shapes, seed, index)
        weights = {name: base[name] + delta[name] for name in base}
        tokenizer = base_tokenizer
        if extra_vocab:
            start = (index - 1) * EXTRA_PER_EXPERT
            extra = list(EXTRA_CHARS[start : start + EXTRA_PER_EXPERT])
            tokenizer = make_char_tokenizer(CHARS + extra)
            weights = _with_extra_rows(weights, len(extra), seed, index)
        folder = root / f"expert_{index}"
        _save(arch, weights, tokenizer, folder)
        experts.append(folder)
    return TinyFamily(base=root / "base", experts=experts, arch=arch)


def _shapes(arch: str, vocab_size: int) -> dict[str, torch.Size]:
    _, model_cls = ARCHS[arch]
    with torch.device("meta"):
        model = model_cls(_config(arch, vocab_size))
    return {name: tensor.shape for name, tensor in sorted(model.state_dict().items())}


def reshard(folder: Path, out: Path, max_shard_size: str) -> None:
    """Rewrite the checkpoint in `folder` as safetensors shards plus an index, in `out`."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for file in Path(folder).iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy2(file, Path(out) / file.name)
