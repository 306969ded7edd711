"""lm-eval's HF model around a model object that stays in memory across candidates.

`ResidentLM` is lm-eval's `HFLM` with tokenization memoized: the prompts are the same for every
candidate, so each string (and each padded batch of them) is encoded once per search. New weights
are written into the same model object between runs; nothing here holds a copy of them.

`batch_size="auto"` is sized for the requests actually scored: the longest of them (prompt and
continuation, or prompt plus the generation budget), not the model's maximum length, at which
lm-eval's own probe runs five forward passes (8,192 tokens for SmolLM2: minutes on a CPU; on a
GPU, a batch sized for that length rather than for the work). On a GPU the probe doubles the
batch from 1 while a forward pass at that length fits (up to MAX_AUTO_BATCH); on a CPU memory is
not what limits a batch, so it takes the largest power of two with at most CPU_BATCH_TOKENS
tokens. Each set of requests (the same for every candidate of a search) gets its size once and
keeps it, so every candidate is batched alike.
"""

from __future__ import annotations

from dataclasses import dataclass
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
# On a CPU, scoring time is flat from a few hundred tokens per batch on (SmolLM2-135M, capitals:
# batch 4 / 16 / 64 of 19-token requests took 14.7 / 11.8 / 11.8 s); larger ones only add padding.
CPU_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class BatchProbe:
    """How `auto` was resolved: the longest request (tokens), the batch chosen, and why."""

    length: int
    batch_size: int
    how: str  # 'cpu token budget' or 'largest that fits'


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
        self.auto = batch_size == "auto"
        self.probes: dict[tuple[int, int], BatchProbe] = {}  # (longest, requests) -> size
        self.probe: BatchProbe | None = None  # the one the last requests ran with
        self._pieces = TokenPieces(tokenizer)
        self._encoded: dict[tuple[Any, ...], list[int]] = {}
        self._batches: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._decoded: dict[tuple[Any, ...], str] = {}

    def resolve_batch_size(self, length: int, requests: int) -> BatchProbe:
        """The batch size for `requests` requests of up to `length` tokens (module docstring)."""
        length = max(1, min(length, self.max_length))
        cap = max(1, min(self.max_batch_size, requests))
        if self.device.type == "cpu":
            batch = _power_of_two_at_most(min(cap, CPU_BATCH_TOKENS // length))
            return BatchProbe(length, batch, "cpu token budget")
        return BatchProbe(length, self._largest_fitting(length, cap), "largest that fits")

    def _largest_fitting(self, length: int, cap: int) -> int:
        batch = 1
        while batch * 2 <= cap:
            try:
                ids = torch.ones((batch * 2, length), dtype=torch.long, device=self.device)
                with torch.no_grad():
                    torch.log_softmax(self._model_call(ids), dim=-1, dtype=self.softmax_dtype)
            except torch.OutOfMemoryError:
                break
            finally:
                ids = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            batch *= 2
        return batch

    def _longest(self, requests: list, kind: str) -> int:
        if kind == "loglikelihood":
            pairs = (self._encode_pair(*r.args) for r in requests)
            return max(len(context) + len(continuation) for context, continuation in pairs)
        if kind == "generate_until":
            budget = self.max_gen_toks
            return max(
                len(self.tok_encode(r.args[0])) + int(r.args[1].get("max_gen_toks", budget))
                for r in requests
            )
        return max(len(self.tok_encode(r.args[0])) for r in requests)  # rolling: windows

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

    def _resolve_for(self, requests: list, kind: str) -> None:
        if not self.auto or not requests:
            return
        key = (self._longest(requests, kind), len(requests))
        if key not in self.probes:
            self.probes[key] = self.resolve_batch_size(*key)
        self.probe = self.probes[key]
        self.batch_size_per_gpu = self.probe.batch_size

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        self._resolve_for(requests, "generate_until")
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        self._resolve_for(requests, "loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        self._resolve_for(requests, "loglikelihood_rolling")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)
