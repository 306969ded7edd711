"""mergekit 0.1.5 as a test oracle: merge a recipe with both engines and compare every tensor.

mergekit runs in-process. TIES and breadcrumbs keep entries by magnitude rank and mergekit sorts
with an unstable sort, so among entries of equal magnitude at the cut its choice is arbitrary;
`stable_sorts()` makes its sorts keep equal entries in index order, evomerge's rule.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mergekit.sparsify as mergekit_sparsify
import pytest
import torch
from helpers import load_weights
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge as mergekit_run_merge
from mergekit.options import MergeOptions

from evomerge.merge.materialize import run_merge
from evomerge.merge.recipe import parse_recipe

ATOL = 1e-6
CONFIG_FIELDS = ["num_hidden_layers", "vocab_size", "architectures", "hidden_size"]


class StableSortTorch:
    """`torch` as mergekit.sparsify sees it, with sorts that keep equal entries in index order."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def argsort(tensor: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.argsort(tensor, stable=True, **kwargs)

    @staticmethod
    def sort(tensor: torch.Tensor, **kwargs: Any):
        return torch.sort(tensor, stable=True, **kwargs)


@contextlib.contextmanager
def stable_sorts() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mergekit_sparsify, "torch", StableSortTorch())
        yield


def run_mergekit(
    config: dict[str, Any],
    out_dir: Path,
    seed: int | None = None,
    card: bool = False,
    source: str | None = None,
) -> Path:
    """mergekit's merge of `config` into `out_dir`. With `card`, it also writes its model card
    and `mergekit_config.yml` (`source`'s text, as `mergekit-yaml` saves the recipe file, else
    its normalized form), as a merge published by mergekit has."""
    merge_config = MergeConfiguration.model_validate(copy.deepcopy(config))
    options = MergeOptions(
        device="cpu",
        quiet=True,
        write_model_card=card,
        copy_tokenizer=True,
        random_seed=seed,
        lora_merge_cache=str(out_dir.parent / f"{out_dir.name}-lora-cache"),
    )
    with torch.random.fork_rng():  # mergekit seeds the global generators
        mergekit_run_merge(merge_config, str(out_dir), options=options, config_source=source)
    return out_dir


def run_evomerge(config: dict[str, Any], out_dir: Path, seed: int = 0) -> Path:
    recipe = parse_recipe(copy.deepcopy(config))
    return run_merge(recipe, out_dir, device="cpu", seed=seed, progress=False)


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    assert any(model_dir.glob("*.safetensors")), f"{model_dir}: no safetensors written"
    return load_weights(model_dir)


def load_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.float() - b.float()).abs().max().item()


def assert_tensors_match(
    evo: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    atol: float = ATOL,
    names: Callable[[str], bool] = lambda name: True,
) -> float:
    """Same names, shapes and dtypes; returns the largest abs difference (0.0: bit-exact)."""
    evo_names = sorted(n for n in evo if names(n))
    ref_names = sorted(n for n in ref if names(n))
    assert evo_names == ref_names, (
        f"tensor names differ: only evomerge {sorted(set(evo_names) - set(ref_names))}, "
        f"only mergekit {sorted(set(ref_names) - set(evo_names))}"
    )
    worst = 0.0
    for name in ref_names:
        a, b = evo[name], ref[name]
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != mergekit {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != mergekit {b.dtype}"
        diff = max_abs_diff(a, b)
        assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol:g}"
        worst = max(worst, diff)
    return worst


def assert_configs_match(evo_dir: Path, ref_dir: Path) -> None:
    evo, ref = load_config(evo_dir), load_config(ref_dir)
    for key in CONFIG_FIELDS:
        assert evo.get(key) == ref.get(key), f"config.json {key}: {evo.get(key)} != {ref.get(key)}"


def merge_both(config: dict[str, Any], tmp_path: Path, seed: int = 0) -> tuple[Path, Path, float]:
    """Merge with both engines; assert tensor and config parity; return dirs and max diff."""
    evo_dir = run_evomerge(config, tmp_path / "evomerge", seed=seed)
    ref_dir = run_mergekit(config, tmp_path / "mergekit", seed=seed)
    worst = assert_tensors_match(load_tensors(evo_dir), load_tensors(ref_dir))
    assert_configs_match(evo_dir, ref_dir)
    print(f"max abs diff vs mergekit: {worst:.3g}{' (bit-exact)' if worst == 0 else ''}")
    return evo_dir, ref_dir, worst
