"""lm-eval's HF model around a model object that stays in memory across candidates.

`ResidentLM` is lm-eval's `HFLM` with tokenization memoized: the prompts are the same for every
candidate, so each string (and each padded batch of them) is encoded once per search. New weights
are written into the same model object between runs; nothing here holds a copy of them.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from torch import nn

from evomerge.evals.greedy import TokenPieces, greedy_generate, greedy_refusal
from evomerge.evals.logfilter import drop_messages

# Passing a model object is the point here, not a mistake to warn about.
drop_messages(
    "lm_eval.models.huggingface",
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)

MAX_DECODED = 100_000  # remembered decodings of generated token sequences

# lm-eval's HFLM probes with batches of this size for --batch-size auto; kept as its default.
MAX_AUTO_BATCH = 64


class ResidentLM(HFLM):
    """HFLM over an in-memory model whose tokenizer is fixed, so encodings can be reused."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int | str = "auto"):
        super().__init__(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_batch_size=MAX_AUTO_BATCH,
        )
        self.quiet = False  # no progress bars (searches score hundreds of candidates)
        self.fast_greedy = True  # see greedy.py; False runs every generation through generate()
        # Which path the generations took, so a report can say when the fast one fell away.
        self.greedy_batches = 0
        self.generate_batches = 0
        self.greedy_refusal: str | None = None
        self._pieces = TokenPieces(tokenizer)
        self._encoded: dict[tuple[Any, ...], list[int]] = {}
        self._batches: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._decoded: dict[tuple[Any, ...], str] = {}

    def resolve_batch_size(self) -> int:
        """Fix 'auto' to a number once; lm-eval would probe again on every run."""
        if self.batch_size_per_gpu == "auto":
            self.batch_size_per_gpu = int(self._detect_batch_size())
        return int(self.batch_size_per_gpu)

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        key = (string, add_special_tokens, left_truncate_len, *sorted(kwargs.items()))
        if key not in self._encoded:
            self._encoded[key] = super().tok_encode(
                string, add_special_tokens, left_truncate_len, **kwargs
            )
        return list(self._encoded[key])

    def tok_batch_encode(
        self,
        strings: list[str],
        padding_side: str = "left",
        left_truncate_len: int | None = None,
        truncation: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(strings), padding_side, left_truncate_len, truncation)
        if key not in self._batches:
            self._batches[key] = super().tok_batch_encode(
                strings, padding_side, left_truncate_len, truncation
            )
        ids, mask = self._batches[key]
        return ids.clone(), mask.clone()

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        # Candidates mostly generate the same answers; the set of distinct ones is kept bounded.
        key = (tuple(tokens) if isinstance(tokens, list) else tokens, skip_special_tokens)
        text = self._decoded.get(key)
        if text is None:
            if len(self._decoded) >= MAX_DECODED:
                self._decoded.clear()
            text = self._decoded[key] = super().tok_decode(tokens, skip_special_tokens)
        return text

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        refusal = (
            greedy_refusal(self.model, self.tokenizer, stop, generation_kwargs)
            if self.fast_greedy
            else "switched off (fast_greedy = False)"
        )
        if refusal is None:
            self.greedy_batches += 1
            return greedy_generate(
                self.model,
                context,
                generation_kwargs["attention_mask"],
                max_length=max_length,
                stop=stop,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
                pieces=self._pieces,
            )
        self.generate_batches += 1
        self.greedy_refusal = refusal
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)
