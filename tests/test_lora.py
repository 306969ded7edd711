"""LoRA references (`model: base+adapter`) against mergekit 0.1.5, which merges the adapter
into the base with PEFT before merging: adapters made here with PEFT on the tiny family (q/v
projections; rsLoRA; an embedding LoRA with lm_head saved whole; a bf16 base), each merged
by both tools, bit for bit. Bad adapters are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import build_tiny_family
from mergekit_oracle import assert_tensors_match, load_tensors, run_evomerge, run_mergekit

from evomerge.merge.errors import MergeError
from evomerge.merge.recipe import parse_recipe

ADAPTERS = {
    "qv": {"target_modules": ["q_proj", "v_proj"]},
    "rslora_mlp": {"target_modules": ["up_proj", "down_proj"], "use_rslora": True},
    "embedding_and_saved_head": {
        "target_modules": ["embed_tokens", "o_proj"],
        "modules_to_save": ["lm_head"],
    },
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("lora_family"), n_experts=1, seed=4)


def make_adapter(base: Path, out: Path, dtype: torch.dtype = torch.float32, **options) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a trained lm_head copy, so that replacing it shows
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.01)
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_lora_reference_matches_mergekit(case, family, tmp_path):
    adapter = make_adapter(family.base, tmp_path / "adapter", **ADAPTERS[case])
    config = {
        "merge_method": "linear",
        "models": [
            {"model": f"{family.base}+{adapter}", "parameters": {"weight": 0.7}},
            {"model": str(family.experts[0]), "parameters": {"weight": 0.3}},
        ],
        "dtype": "float32",
    }
    evo = load_tensors(run_evomerge(config, tmp_path / "evomerge"))
    ref = load_tensors(run_mergekit(config, tmp_path / "mergekit"))
    assert assert_tensors_match(evo, ref, atol=0.0) == 0.0
    plain = load_tensors(run_evomerge({**config, "models": [
        {"model": str(family.base), "parameters": {"weight": 0.7}}, config["models"][1]]},
        tmp_path / "plain"))  # fmt: skip
    assert any(not torch.equal(evo[n], plain[n]) for n in evo)  # the adapter changed something


def test_lora_on_a_bf16_base_rounds_as_peft_does(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base_bf16"
    AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.bfloat16).save_pretrained(base)
    for file in family.base.glob("tokenizer*"):
        (base / file.name).write_bytes(file.read_bytes())
    adapter = make_adapter(base, tmp_path / "adapter", torch.bfloat16, target_modules=["q_proj"])
    model = {"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}
    config = {"merge_method": "linear", "dtype": "bfloat16", "models": [model]}
    evo = load_tensors(run_evomerge(config, tmp_path / "evomerge"))
    ref = load_tensors(run_mergekit(config, tmp_path / "mergekit"))
    assert assert_tensors_match(evo, ref, atol=0.0) == 0.0


def test_mergekits_mapping_form_names_the_same_reference(family):
    data = {"merge_method": "linear",
            "models": [{"model": {"model": {"path": "a"}, "lora": {"path": "b"}}}]}  # fmt: skip
    assert parse_recipe(data).models[0].model == "a+b"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"use_dora": True}, "a DoRA adapter; merge it with PEFT first"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern/alpha_pattern are not supported"),
        ({"peft_type": "IA3"}, "a IA3 adapter; only LoRA adapters merge"),
    ],
)
def test_unsupported_adapters_are_one_line_errors(change, expected, family, tmp_path):
    adapter = make_adapter(family.base, tmp_path / "adapter", target_modules=["q_proj"])
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    config = {"merge_method": "linear", "models": [{"model": f"{family.base}+{adapter}"}]}
    with pytest.raises(MergeError) as info:
        run_evomerge(config, tmp_path / "out")
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_is_refused(family, tmp_path):
    adapter = make_adapter(family.base, tmp_path / "adapter", target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = {k.replace("layers.0.", "layers.99."): v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    config = {"merge_method": "linear", "models": [{"model": f"{family.base}+{adapter}"}]}
    with pytest.raises(MergeError, match=r"layers\.99\.self_attn\.q_proj\.weight, which .*not"):
        run_evomerge(config, tmp_path / "out")


def test_a_missing_adapter_is_named_before_anything_is_read(family, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": f"{family.base}+{tmp_path}/gone"}]}
    with pytest.raises(MergeError, match=r"/gone: no such directory, and not a Hub id"):
        run_evomerge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
