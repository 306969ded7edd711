"""Greedy decoding with the forward calls `model.generate` makes, and little else around them.

On small models `generate` spends as long on its own bookkeeping (configuration, logits processors,
lm-eval's stop criteria decoding every sequence at every step) as on the forward passes. For plain
greedy decoding this loop passes the model exactly the inputs `generate` passes (same cache class,
position ids, attention mask or none when nothing is padded, `logits_to_keep=1`), so it picks the
same tokens. It stops a sequence at its end-of-sequence token (padding after it, as `generate`
does) or once its decoded text contains a stop sequence; lm-eval cuts the text at the first stop
sequence, so stopping there or later gives the same answer.

`greedy_supported` says when this holds; otherwise lm-eval's own path through `generate` runs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

# Generation-config fields that leave greedy decoding untouched (sampling knobs are unused).
_NEUTRAL_CONFIG = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "max_length",
    "transformers_version",
    "_from_model_config",
}


def eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def cache_argument(model: nn.Module) -> str | None:
    """The name `model.forward` takes its KV cache by: `cache` since transformers 5.24,
    `past_key_values` before (still accepted there, with a deprecation warning)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def greedy_refusal(
    model: nn.Module, tokenizer: Any, stop: list[str], generation_kwargs: dict[str, Any]
) -> str | None:
    """Why `greedy_generate` might not pick the tokens `model.generate` would; None when it does."""
    config = getattr(model, "generation_config", None)
    if config is None or model.config.is_encoder_decoder:
        return "no generation config, or an encoder-decoder model"
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "forward() takes no position_ids"
    if cache_argument(model) is None:
        return "forward() takes no cache (neither `cache` nor `past_key_values`)"
    # lm-eval's HFLM decodes greedily when do_sample is false, or unset with temperature 0.
    do_sample = generation_kwargs.get("do_sample")
    if do_sample is None:
        do_sample = generation_kwargs.get("temperature", 0.0) != 0.0
    if do_sample:
        return "the task samples (do_sample or a temperature)"
    extra = set(generation_kwargs) - {"attention_mask", "do_sample", "temperature"}
    if extra:
        return f"generation kwargs {sorted(extra)}"
    fields = set(config.to_diff_dict()) - _NEUTRAL_CONFIG
    if fields or config.cache_implementation is not None:
        return f"generation config sets {sorted(fields) or ['cache_implementation']}"
    # lm-eval adds the tokenizer's end-of-sequence text to the stop sequences; it must end
    # sequences as a token, because skip_special_tokens hides it from the text.
    if tokenizer.eos_token_id not in eos_ids(model):
        return "the tokenizer's eos token is not the model's"
    special = set(tokenizer.all_special_tokens) - {tokenizer.eos_token}
    if any(s in special for s in stop):
        return "a stop sequence is a special token"
    return None


def greedy_supported(
    model: nn.Module, tokenizer: Any, stop: list[str], generation_kwargs: dict[str, Any]
) -> bool:
    """Whether `greedy_generate` picks the tokens `model.generate` would, for this call."""
    return greedy_refusal(model, tokenizer, stop, generation_kwargs) is None


class TokenPieces(dict):
    """Token id -> its text alone; a cheap first test for a stop sequence."""

    def __init__(self, tokenizer: Any):
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, token: int) -> str:
        self[token] = text = self.tokenizer.decode([token], skip_special_tokens=True)
        return text


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_length: int,
    stop: list[str],
    tokenizer: Any,
    pad_token_id: int,
    pieces: dict[int, str] | None = None,
) -> torch.Tensor:
    """Context plus greedy continuation, shaped like `model.generate`'s output."""
    batch, context_len = input_ids.shape
    pieces = pieces if pieces is not None else TokenPieces(tokenizer)
    eos = torch.tensor(sorted(eos_ids(model)), device=input_ids.device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    extra: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    extra[cache_argument(model) or "past_key_values"] = cache
    ended = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)  # by end-of-sequence
    # The end-of-sequence text (lm-eval adds it) is the eos token: `ended` covers it.
    texts = [s for s in stop if s != tokenizer.eos_token]
    stopped = [False] * batch  # by a stop sequence in the text
    tails = [""] * batch
    window = max((len(s) for s in texts), default=0) + 8
    steps: list[torch.Tensor] = []
    step_ids = input_ids
    for _ in range(max_length - context_len):
        if mask is not None:
            extra["attention_mask"] = mask
        logits = model(
            input_ids=step_ids,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **extra,
        ).logits
        token = logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)
        token = torch.where(ended, pad_token_id, token)
        ended |= torch.isin(token, eos)
        steps.append(token)
        if texts:
            _check_stops(steps, token, ended, stopped, tails, texts, window, pieces, tokenizer)
        if all(e or s for e, s in zip(ended.tolist(), stopped, strict=True)):
            break
        step_ids = token[:, None]
        position_ids = position_ids[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


def _check_stops(
    steps: list[torch.Tensor],
    token: torch.Tensor,
    ended: torch.Tensor,
    stopped: list[bool],
    tails: list[str],
    texts: list[str],
    window: int,
    pieces: dict[int, str],
    tokenizer: Any,
) -> None:
    """Mark sequences whose generated text now contains a stop sequence."""
    for i, (t, is_end) in enumerate(zip(token.tolist(), ended.tolist(), strict=True)):
        if stopped[i] or is_end:
            continue
        tails[i] = (tails[i] + pieces[t])[-window:]
        if any(s in tails[i] for s in texts):
            # The pieces hint at a stop; the decoded text decides.
            text = tokenizer.decode([int(s[i]) for s in steps], skip_special_tokens=True)
            stopped[i] = any(s in text for s in texts)
