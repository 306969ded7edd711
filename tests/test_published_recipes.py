"""A corpus of mergekit recipes that people published (model cards, `mergekit_config.yml` files,
mergekit's own examples, tutorials), each merged by evomerge and by mergekit-yaml 0.1.5 on a
tiny family and compared tensor by tensor.

`tests/data/published_recipes.yaml` holds each recipe as published, with its source. To run
on the tiny family a recipe is adapted, and only so: its models are mapped, in order of first
mention, onto the family (the base model onto the family's base, the others onto its experts;
`model+lora` onto the base with a LoRA adapter made here), and its layer ranges are scaled
from the largest layer index the recipe names onto the family's layers. Methods, parameters,
gradients, filters, dtypes and tokenizer settings stay as published. Deterministic methods
must agree bit for bit; DARE and DELLA draw random masks from other generators, so for them
the tensors' names, shapes and dtypes must agree and the merged change from the base must be
of the same size.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from families import build_tiny_family
from mergekit_oracle import assert_tensors_match, load_tensors, run_evomerge, run_mergekit

from evomerge.merge.errors import MergeError

CORPUS = Path(__file__).with_name("data") / "published_recipes.yaml"
ENTRIES = yaml.safe_load(CORPUS.read_text())
STOCHASTIC = {"dare_ties", "dare_linear", "della", "della_linear"}
PROMOTED = {"arcee_fusion", "ramplus_tl"}
N_EXPERTS = 16


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    fam = build_tiny_family(root / "family", n_experts=N_EXPERTS, seed=11)
    return fam, make_adapter(fam.base, root / "adapter")


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"])
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_the_corpus_covers_every_method_in_half_precision():
    from evomerge.merge.methods import method_names

    methods = {entry["method"] for entry in ENTRIES}
    assert len(ENTRIES) >= 30 and methods == set(method_names())
    dtypes = {yaml.safe_load(entry["recipe"]).get("dtype") for entry in ENTRIES}
    assert {"bfloat16", "float16"} <= dtypes
    assert all(entry["source"].startswith("http") for entry in ENTRIES)


def adapt(recipe: dict[str, Any], base: Path, experts: list[Path], adapter: Path) -> dict:
    """The recipe on the tiny family (module docstring): models mapped, layer ranges scaled."""
    recipe = copy.deepcopy(recipe)
    names: dict[str, str] = {}
    if recipe.get("base_model"):
        names[_key(recipe["base_model"])] = str(base)
    spare = itertools.cycle(experts)  # a recipe with more models than experts reuses them

    def mapped(ref: Any) -> str:
        key = _key(ref)
        if key not in names:
            names[key] = str(next(spare))
        target = names[key]
        return f"{target}+{adapter}" if "+" in key else target

    top = max((end for _, end in _layer_ranges(recipe)), default=1)
    layers = 4  # the tiny family's

    def walk(node: Any, key: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            if key == "layer_range":
                start, end = (round(x * layers / top) for x in node)
                return [min(start, layers - 1), max(end, min(start, layers - 1) + 1)]
            return [walk(v) for v in node]
        if key in ("model", "base_model", "tokenizer_source", "source") and node not in (
            "union", "base", None):  # fmt: skip
            return mapped(node)
        return node

    return walk(recipe)


def _layer_ranges(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "layer_range":
                yield value
            else:
                yield from _layer_ranges(value)
    elif isinstance(node, list):
        for value in node:
            yield from _layer_ranges(value)


def _key(ref: Any) -> str:
    if isinstance(ref, dict):  # mergekit's {model: {path: ...}, lora: ...} form
        model = ref.get("model", ref)
        path = model.get("path") if isinstance(model, dict) else model
        return f"{path}+lora" if ref.get("lora") else str(path)
    return str(ref)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_published_recipe_merges_as_mergekit_does(entry, family, tmp_path):
    fam, adapter = family
    recipe = adapt(yaml.safe_load(entry["recipe"]), fam.base, fam.experts, adapter)
    try:
        ref = load_tensors(run_mergekit(copy.deepcopy(recipe), tmp_path / "mergekit", seed=1))
    except Exception:  # a recipe mergekit itself refuses: evomerge refuses it in one line
        with pytest.raises(MergeError) as info:
            run_evomerge(copy.deepcopy(recipe), tmp_path / "evomerge", seed=1)
        assert "\n" not in str(info.value)
        return
    evo = load_tensors(run_evomerge(copy.deepcopy(recipe), tmp_path / "evomerge", seed=1))
    if entry["method"] in PROMOTED:
        # mergekit computes these in float32 and writes that, whatever the recipe's dtype
        # (its config.json names the recipe's); evomerge writes the recipe's: equal rounded.
        ref = {n: t.to(evo[n].dtype) if n in evo else t for n, t in ref.items()}
    if entry["method"] not in STOCHASTIC:
        assert assert_tensors_match(evo, ref, atol=0.0) == 0.0
        return
    assert {n: (t.shape, t.dtype) for n, t in evo.items()} == {
        n: (t.shape, t.dtype) for n, t in ref.items()
    }
    base = load_tensors(fam.base)
    same = [n for n in evo if n in base and base[n].shape == evo[n].shape]

    def change(merged: dict[str, torch.Tensor]) -> float:
        return sum((merged[n].float() - base[n].float()).abs().sum().item() for n in same)

    assert change(evo) == pytest.approx(change(ref), rel=0.1)  # the same size of merged change
