"""Peak bytes of the tensors torch allocates inside a block, on any device, CPU included (where
torch keeps no allocator statistics): every op's outputs are tracked by storage until freed."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakAllocations(TorchDispatchMode):
    """`with PeakAllocations() as seen: ...`; then `seen.peak` (bytes of new storages alive at
    once, at most). Storages that existed before the block are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() == 0 or self._existed((args, kwargs), key):
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out

    @staticmethod
    def _existed(args, key: int) -> bool:
        """An in-place op's or `out=` op's result is an input's storage."""
        return any(
            isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == key
            for a in tree_flatten(args)[0]
        )

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)
