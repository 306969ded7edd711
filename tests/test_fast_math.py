"""Faster merge math, the same bits: a span at a time (merge/methods/chunks.py) equals the same
math over whole tensors wherever the spans fall (every step is an elementwise torch kernel); DELLA
ranks by inverting its sort, as mergekit ranks by sorting twice.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.methods import TensorGroup, chunks, get_method

METHODS = {  # name: (shared, per-input parameters)
    "linear": ({"normalize": True}, {"weight": 0.3}),
    "task_arithmetic": ({"normalize": False, "lambda": 1.0, "rescale": False}, {"weight": 0.7}),
    "ties": ({"normalize": True, "lambda": 0.9, "rescale": False}, {"weight": 0.6, "density": 0.4}),
    "dare_ties": (
        {"normalize": False, "lambda": 1.0, "rescale": True},
        {"weight": 0.5, "density": 0.5},
    ),
    "dare_linear": (
        {"normalize": False, "lambda": 1.3, "rescale": True},
        {"weight": -0.4, "density": 0.7},
    ),
}


def merged(method: str, tensors: list[torch.Tensor], chunk: int, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(chunks, "CHUNK", chunk)
    monkeypatch.setattr(chunks, "LONG", 1)  # task-vector sums span CHUNK * LONG entries
    assert len(list(chunks.spans(tensors[0].numel()))) == -(-tensors[0].numel() // chunk)
    shared, params = METHODS[method]
    per_input = [{**params, "weight": params["weight"] * (i + 1)} for i in range(len(tensors))]
    base_index = None if method == "linear" else 0

    def generators(i: int) -> torch.Generator:
        return torch.Generator().manual_seed(100 + i)

    group = TensorGroup(tensors, base_index, "w")
    return get_method(method).merge(group, shared, per_input, generators)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("models", [2, 3, 4])
@pytest.mark.parametrize("method", list(METHODS))
def test_spans_anywhere_give_the_whole_tensor_result(method, models, dtype, monkeypatch):
    torch.manual_seed(models)
    base = torch.randn(37, 211).to(dtype)
    tensors = [base] + [(base + 0.1 * torch.randn(37, 211)).to(dtype) for _ in range(models - 1)]
    tensors[1][0, :50] = base[0, :50]  # entries where a model agrees with the base
    whole = merged(method, tensors, 1 << 40, monkeypatch)
    for chunk in (1, 997, 4096):
        spanned = merged(method, tensors, chunk, monkeypatch)
        assert spanned.dtype == whole.dtype == dtype
        assert torch.equal(spanned, whole), (chunk, (spanned != whole).sum())
        assert torch.equal(spanned.view(torch.int8), whole.view(torch.int8))  # signed zeros too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300,), (17, 4099)])
def test_della_draws_mergekits_mask_from_the_same_generator_state(shape, dtype):
    """DELLA ranks each entry by inverting the sort permutation (a scatter) where mergekit sorts
    it again: the same ranks, so the same probabilities and, from one RNG state, the same mask."""
    from mergekit.sparsify import RescaleNorm
    from mergekit.sparsify import della_magprune as mergekit_della

    from evomerge.merge.methods.sparsify import della_magprune

    tensor = torch.randn(shape).to(dtype)
    tensor[..., :40] = tensor[..., 40:80]  # equal magnitudes: ranks must still be a permutation
    torch.manual_seed(7)
    expected = mergekit_della(tensor, 0.4, 0.2, RescaleNorm.l1)
    torch.manual_seed(7)
    got = della_magprune(tensor, 0.4, True, 0.2, torch.default_generator)
    assert torch.equal(got, expected)
