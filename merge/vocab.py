"""`tokenizer_source`: the output vocabulary and how each model's embedding rows map onto it.

Like mergekit: the output tokenizer is the base's (`base`), a named model's, or the base's
extended with every other model's tokens (`union`). A token some inputs lack gets, in those
inputs, the row of the only model that has it, else the base's row, else the mean of the
rows of the models that have it; so merging such a row keeps the known embedding.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from evomerge.merge.errors import MergeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evomerge.merge.checkpoint import Checkpoint
    from evomerge.merge.recipe import Recipe


@dataclass(frozen=True)
class TokenOverride:
    """A configured token's row: zeros (model None), or row `row` of `model`."""

    model: str | None
    row: int
    force: bool


@dataclass
class Vocabulary:
    tokenizer: PreTrainedTokenizerBase
    size: int
    """Rows of the output embedding (the vocabulary padded to pad_to_multiple_of)."""
    permutations: dict[str, torch.Tensor]
    """Per model: for each output token id, its row in that model, or -1."""
    base_model: str | None
    overrides: dict[int, TokenOverride]
    """`tokenizer.tokens`, by output token id."""


def _load_tokenizer(ckpt: Checkpoint) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path)
    except (OSError, ValueError) as exc:
        raise MergeError(f"{ckpt.ref}: cannot load its tokenizer ({exc})") from None


def _real_vocab(tokenizer: PreTrainedTokenizerBase, ckpt: Checkpoint) -> dict[str, int]:
    size = ckpt.vocab_size or len(tokenizer.get_vocab())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda e: e[1])  # by id, not hash order
    return {tok: i for tok, i in vocab if i < size}


def _union_tokenizer(
    base_tok, tokenizers: dict[str, PreTrainedTokenizerBase], checkpoints: dict[str, Checkpoint]
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    new_tokens: dict[str, None] = {}
    special = {}
    for ref, tok in tokenizers.items():
        added = tok.added_tokens_decoder
        added_text = {info.content for info in added.values()}
        for text in _real_vocab(tok, checkpoints[ref]):
            if text not in added_text:
                new_tokens.setdefault(text)
        size = checkpoints[ref].vocab_size or len(tok.get_vocab())
        for idx, info in added.items():
            if idx < size:
                special.setdefault(info.content, info)
    # Copy the base tokenizer through disk so the loaded one is not modified.
    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp)
    base_vocab = base_tok.get_vocab()
    for text in new_tokens:
        if text not in special and text not in base_vocab:
            out.add_tokens(text)
    for info in special.values():
        out.add_tokens(info)
    return out


def build_vocabulary(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> Vocabulary | None:
    source = recipe.effective_tokenizer_source
    if source is None:
        return None
    base_ref = recipe.base_model or recipe.referenced_models()[0]
    tokenizers = {base_ref: _load_tokenizer(checkpoints[base_ref])}
    for ref in recipe.referenced_models():
        tokenizers.setdefault(ref, _load_tokenizer(checkpoints[ref]))
    if source == "union":
        tokenizer = _union_tokenizer(tokenizers[base_ref], tokenizers, checkpoints)
    elif source == "base":
        tokenizer = tokenizers[base_ref]
    else:
        tokenizer = tokenizers[source]
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    pad = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer else None
    if pad and size % pad:
        size = (size // pad + 1) * pad
    permutations = {}
    real_vocabs = {}
    for ref, tok in tokenizers.items():
        model_vocab = real_vocabs[ref] = _real_vocab(tok, checkpoints[ref])
        perm = torch.full((len(vocab),), -1, dtype=torch.long)
        for text, new_id in vocab.items():
            perm[new_id] = model_vocab.get(text, -1)
        permutations[ref] = perm
    configured = (recipe.tokenizer.tokens if recipe.tokenizer else None) or {}
    overrides = {
        vocab[text]: _override(text, cfg, vocab[text], permutations, real_vocabs)
        for text, cfg in configured.items()
        if text in vocab  # mergekit ignores tokens the output vocabulary lacks
    }
    return Vocabulary(tokenizer, size, permutations, base_ref, overrides)


def _override(text, cfg, token_id, permutations, real_vocabs) -> TokenOverride:
    from evomerge.merge.recipe import ModelTokenSource, ZeroSource

    where = f"tokenizer.tokens[{text!r}]"
    if isinstance(cfg.source, ZeroSource):
        return TokenOverride(None, -1, cfg.force)
    model = cfg.source.model if isinstance(cfg.source, ModelTokenSource) else cfg.source
    if model not in permutations:
        raise MergeError(f"{where}: source {model} is not one of the recipe's models; name one")
    if isinstance(cfg.source, ModelTokenSource):
        src = cfg.source
        row = src.token_id if src.token_id is not None else real_vocabs[model].get(src.token, -1)
        if row < 0 or row >= len(real_vocabs[model]):
            what = f"token {src.token!r}" if src.token is not None else f"token_id {row}"
            raise MergeError(f"{where}: {model} has no {what}")
    else:
        row = int(permutations[model][token_id])
        if row < 0:
            raise MergeError(f"{where}: {model} does not have this token; choose another source")
    return TokenOverride(model, row, cfg.force)


def permute_rows(
    vocab: Vocabulary, models: list[str], tensors: list[torch.Tensor], base_model: str | None
) -> list[torch.Tensor]:
    """Re-index each model's vocabulary rows (axis 0) onto the output vocabulary."""
    n_tokens = len(vocab.permutations[models[0]])
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    shape = tensors[0].shape[1:]
    perms = [vocab.permutations[m].to(device) for m in models]
    present = torch.stack([p >= 0 for p in perms])
    count = present.sum(dim=0)
    defaults = torch.zeros((n_tokens, *shape), dtype=dtype, device=device)
    configured = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    for token_id, override in vocab.overrides.items():  # tokenizer.tokens
        configured[token_id] = True
        if override.model is not None:
            if override.model not in models:
                raise MergeError(
                    f"tokenizer.tokens: token id {token_id} takes its row from {override.model}, "
                    "which has no weight for this tensor"
                )
            source = tensors[models.index(override.model)]
            defaults[token_id] = source[override.row].to(dtype)
    # Tokens in exactly one model: that model's row.
    for m, (perm, tensor) in enumerate(zip(perms, tensors, strict=True)):
        only_here = present[m] & (count == 1) & ~configured
        defaults[only_here] = tensor[perm[only_here]].to(dtype)
    decided = (count <= 1) | configured
    if base_model in models:
        b = models.index(base_model)
        from_base = ~decided & present[b]
        defaults[from_base] = tensors[b][perms[b][from_base]].to(dtype)
        decided |= from_base
    average = ~decided & (count < len(models))
    if average.any():
        acc = torch.zeros((int(average.sum()), *shape), dtype=dtype, device=device)
        ids = average.nonzero().squeeze(1)
        for m, (perm, tensor) in enumerate(zip(perms, tensors, strict=True)):
            has = present[m][ids]
            acc[has] = acc[has] + tensor[perm[ids[has]]].to(dtype)
        defaults[ids] = acc / count[ids].to(dtype).reshape(-1, *([1] * len(shape)))
    forced = [i for i, o in vocab.overrides.items() if o.force]
    results = []
    for perm, tensor, has in zip(perms, tensors, present, strict=True):
        out = torch.zeros((vocab.size, *shape), dtype=dtype, device=device)
        out[:n_tokens][has] = tensor[perm[has]].to(dtype)
        out[:n_tokens][~has] = defaults[~has]
        out[forced] = defaults[forced]
        if vocab.size > n_tokens:
            out[n_tokens:] = out[:n_tokens].mean(dim=0)
        results.append(out)
    return results
