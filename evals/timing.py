"""Time spent inside the model's forward passes, to tell the cost of scoring from its overhead."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class ForwardTimer:
    """Sums wall time inside `model(...)` calls (prefill and every decoding step)."""

    def __init__(self, model: nn.Module):
        self.seconds = 0.0
        self._started: float | None = None
        self._cuda = any(p.is_cuda for p in model.parameters())
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit),
        ]

    def _now(self) -> float:
        if self._cuda:  # kernels run asynchronously: wait for them to count their time
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, *_: Any) -> None:
        self._started = self._now()

    def _exit(self, *_: Any) -> None:
        if self._started is not None:
            self.seconds += self._now() - self._started
            self._started = None

    def reset(self) -> None:
        self.seconds = 0.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
