"""Layer stacking along a data-flow path: in-memory model, scale folding on export, recipe, errors.

Tolerances. Folding the hop scales into o_proj / down_proj is exact except for the RMSNorm eps:
RMSNorm(c x) = x / sqrt(mean(x^2) + eps / c^2). With eps = 0 (models loaded with
rms_norm_eps=0.0) the export and the in-memory model agree up to float32 rounding: ATOL_EXACT =
1e-5 on logits of magnitude ~1.3 (measured: at most 1.0e-6). With the families' own eps = 1e-6
the gap grows like eps / (c_k^2 mean(x^2)), and these untrained models have small hidden states
(mean(x^2) ~ 0.006): PATH, whose cumulative scales go down to 0.2, differs by 8.7e-4, checked
against ATOL_EPS = 5e-3 (leaving the scales out of the weights moves the logits by 1.5).
Trained models, with far larger hidden states, get much closer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from families import build_tiny_family
from helpers import load_weights as weights
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from evomerge.merge.errors import MergeError
from evomerge.merge.materialize import run_merge
from evomerge.merge.recipe import parse_recipe
from evomerge.merge.stacking import (
    PATH_FILE,
    Hop,
    HopLayer,
    StackedModel,
    cumulative_scales,
    export_state_dict,
    passthrough_recipe,
    write_checkpoint,
)

ATOL_EXACT = 1e-5
ATOL_EPS = 5e-3
SCALES = [0.2, 0.5, 1.0, 3.0, 10.0]
# Repeated layers (A[1] three times), both models, scales far from 1; starts and ends with A.
PATH = [("A", 0), ("B", 1, 0.2), ("A", 1, 3.0), ("A", 1, 10.0), ("B", 3), ("A", 1, 0.5), ("A", 3)]

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def family(request, tmp_path_factory):
    seed = {"llama": 0, "mistral": 1}[request.param]  # different weights per architecture
    return build_tiny_family(tmp_path_factory.mktemp(request.param), arch=request.param, seed=seed)


def load(folder: Path, **overrides):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides).eval()


def sources(family, **overrides) -> dict:
    return {"A": load(family.base, **overrides), "B": load(family.experts[0], **overrides)}




def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def model_from_state(like, state: dict[str, torch.Tensor], n_layers: int):
    """A plain model of `like`'s class and config with `n_layers` layers, holding `state`."""
    config = type(like.config)(**{**like.config.to_dict(), "num_hidden_layers": n_layers})
    model = type(like)(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


IDS = torch.randint(3, 45, (3, 12), generator=torch.Generator().manual_seed(0))


def random_paths(count: int, seed: int = 0) -> list[list[Hop]]:
    rng = random.Random(seed)
    return [
        [
            Hop(rng.choice("AB"), rng.randrange(4), rng.choice(SCALES))
            for _ in range(rng.randint(1, 9))
        ]
        for _ in range(count)
    ]


def test_export_equals_stacked_model_without_norm_eps(family):
    models = sources(family, rms_norm_eps=0.0)
    stacked = StackedModel(models, PATH)
    for path in [stacked.path, *random_paths(6)]:
        stacked.set_path(path)
        exported = model_from_state(models["A"], stacked.export_state_dict(), len(path))
        want = logits(stacked.model, IDS)
        torch.testing.assert_close(logits(exported, IDS), want, rtol=0, atol=ATOL_EXACT)
    # Control: the same layers with the scales left out of the weights are far off.
    stacked.set_path(PATH)
    unfolded = export_state_dict(models, [Hop(h.model, h.layer) for h in stacked.path])
    far = logits(model_from_state(models["A"], unfolded, len(PATH)), IDS)
    assert (far - logits(stacked.model, IDS)).abs().max() > 100 * ATOL_EXACT


def test_checkpoint_on_disk_matches_stacked_model(family, tmp_path):
    models = sources(family)
    stacked = StackedModel(models, PATH)
    out = write_checkpoint({"A": family.base, "B": family.experts[0]}, PATH, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    exported = load(out)
    assert type(exported) is type(models["A"])
    assert min(cumulative_scales(PATH)) >= 0.2
    diff = (logits(exported, IDS) - logits(stacked.model, IDS)).abs().max().item()
    assert diff <= ATOL_EPS
    # Without the norm eps the same files agree to float32 rounding.
    exact = StackedModel(sources(family, rms_norm_eps=0.0), PATH).model
    no_eps = load(out, rms_norm_eps=0.0)
    torch.testing.assert_close(logits(no_eps, IDS), logits(exact, IDS), rtol=0, atol=ATOL_EXACT)


def test_export_layout_config_and_side_files(family, tmp_path):
    out = write_checkpoint({"A": family.base, "B": family.experts[0]}, PATH, tmp_path / "out")
    got = weights(out)
    src = {"A": weights(family.base), "B": weights(family.experts[0])}
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((family.base / "config.json").read_text())
    assert config["num_hidden_layers"] == len(PATH)
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in base_config.items() if k != "num_hidden_layers"
    }
    assert sum(n.endswith("self_attn.q_proj.weight") for n in got) == len(PATH)
    assert len(got) == len(src["A"]) + (len(PATH) - 4) * 9  # 9 tensors per Llama layer
    hops = [Hop(*h) for h in PATH]
    for k, (hop, c) in enumerate(zip(hops, cumulative_scales(PATH), strict=True)):
        layer = f"model.layers.{hop.layer}"
        for part in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm"):
            want = src[hop.model][f"{layer}.{part}.weight"]
            assert torch.equal(got[f"model.layers.{k}.{part}.weight"], want)
        for part in ("self_attn.o_proj", "mlp.down_proj"):
            want = src[hop.model][f"{layer}.{part}.weight"] * (1.0 / c)
            assert torch.equal(got[f"model.layers.{k}.{part}.weight"], want)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[name], src["A"][name])
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / file).read_bytes() == (family.base / file).read_bytes()
    assert json.loads((out / PATH_FILE).read_text())["path"][1] == {
        "model": "B",
        "layer": 1,
        "scale": 0.2,
    }


def test_passthrough_recipe_gives_the_export_bit_for_bit(family, tmp_path):
    refs = {"A": str(family.base), "B": str(family.experts[0])}
    recipe = passthrough_recipe(PATH, refs)
    assert recipe["slices"][3]["sources"][0] == {
        "model": refs["A"],
        "layer_range": [1, 2],
        "parameters": {
            "scale": [
                {"filter": "o_proj", "value": 1 / (0.2 * 3.0 * 10.0)},
                {"filter": "down_proj", "value": 1 / (0.2 * 3.0 * 10.0)},
                {"value": 1.0},
            ]
        },
    }
    text = yaml.safe_dump(recipe)  # through YAML, as a user would run it
    recipe = parse_recipe(yaml.safe_load(text))
    merged = run_merge(recipe, tmp_path / "m", device="cpu", progress=False)
    exported = write_checkpoint(refs, PATH, tmp_path / "e")
    in_memory = export_state_dict(sources(family), PATH)
    got, want = weights(merged), weights(exported)
    assert got.keys() == want.keys() == in_memory.keys()
    assert all(torch.equal(got[n], want[n]) and torch.equal(got[n], in_memory[n]) for n in got)
    assert json.loads((merged / "config.json").read_text()) == json.loads(
        (exported / "config.json").read_text()
    )


def test_passthrough_recipe_errors_and_numpy_hops(family):
    refs = {"A": str(family.base), "B": str(family.experts[0])}
    cases = [
        ([("B", 0), ("A", 1)], "starts with B and ends with A, not the base A"),
        ([("A", 0), ("B", 1)], "starts with A and ends with B, not the base A"),
        ([("A", 0, 0.0)], "scale 0.0 must be a finite positive number"),
        ([("A", -1)], "layer index -1 is out of range for A, \\(valid: 0 or more\\)"),
        ([("A", 0), ("C", 0), ("A", 1)], "unknown model 'C'"),
    ]
    for path, message in cases:
        with pytest.raises(MergeError, match=message) as info:
            passthrough_recipe(path, refs)
        assert "\n" not in str(info.value)
    # Optimizers hand out numpy numbers; the recipe holds plain ones (yaml.safe_dump needs them).
    hops = [("A", np.int64(1), np.float32(0.5)), ("A", np.int64(2), np.float64(4.0))]
    assert yaml.safe_load(yaml.safe_dump(passthrough_recipe(hops, refs)))["slices"][1] == {
        "sources": [
            {
                "model": refs["A"],
                "layer_range": [2, 3],
                "parameters": {
                    "scale": [
                        {"filter": "o_proj", "value": 0.5},
                        {"filter": "down_proj", "value": 0.5},
                        {"value": 1.0},
                    ]
                },
            }
        ]
    }
    assert StackedModel(sources(family), hops).path == [Hop("A", 1, 0.5), Hop("A", 2, 4.0)]


def generate(model, ids, mask, use_cache):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


def test_generation_with_kv_cache_equals_without(family, monkeypatch):
    stacked = StackedModel(sources(family), PATH)
    ids = IDS[:2].clone()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as lm-eval batches
    ids[1, :4] = 0
    cached = generate(stacked.model, ids, mask, True)
    assert torch.equal(cached, generate(stacked.model, ids, mask, False))
    assert len(set(cached[0, 12:].tolist())) > 1  # not a degenerate repetition

    # Control: without its own cache slot per hop the repeated layer reads the wrong keys.
    def shared_slot(self, hidden_states, *args, **kwargs):
        return self.layer(hidden_states * self.scale, *args, **kwargs)

    monkeypatch.setattr(HopLayer, "forward", shared_slot)
    with pytest.raises(RuntimeError, match="size of tensor"):  # twice the keys of the mask
        generate(stacked.model, ids, mask, True)
    unpadded = generate(stacked.model, IDS[:1], None, True)
    monkeypatch.undo()
    assert not torch.equal(unpadded, generate(stacked.model, IDS[:1], None, True))


def test_qwen2_sliding_layers_follow_the_path():
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        rms_norm_eps=0.0,
        tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(0)
    a, b = Qwen2ForCausalLM(config).eval(), Qwen2ForCausalLM(config).eval()
    assert a.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    stacked = StackedModel({"A": a, "B": b}, [("A", 0), ("B", 1)])  # no sliding layer yet
    path = [("A", 3), ("B", 0, 2.0), ("A", 3, 0.5), ("A", 1)]
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    stacked.set_path(path)
    assert stacked.model.config.layer_types == types
    ids = IDS[:1]
    cached = generate(stacked.model, ids, None, True)
    assert torch.equal(cached, generate(stacked.model, ids, None, False))
    plain = Qwen2ForCausalLM(Qwen2Config(**{**config.to_dict(), "layer_types": types}))
    plain.load_state_dict(stacked.export_state_dict(), strict=False)  # lm_head is tied
    plain.tie_weights()
    want = logits(plain.eval(), ids)
    torch.testing.assert_close(logits(stacked.model, ids), want, rtol=0, atol=ATOL_EXACT)
    # Control: the window matters here (12 tokens, window 4).
    no_window = {**config.to_dict(), "use_sliding_window": False, "layer_types": None}
    full = Qwen2ForCausalLM(Qwen2Config(**no_window))
    assert full.config.layer_types == ["full_attention"] * 4
    full.load_state_dict(plain.state_dict())
    assert (logits(full.eval(), ids) - want).abs().max() > 100 * ATOL_EXACT


def test_stacked_model_shares_weights(family):
    models = sources(family)
    stacked = StackedModel(models, [("A", 1)])
    one = {p.data_ptr() for p in stacked.model.parameters()}
    stacked.set_path([("A", 1, s) for s in SCALES * 4])  # the same layer 20 times
    layers = stacked.model.model.layers
    assert len(layers) == 20 and stacked.model.config.num_hidden_layers == 20
    assert all(hop.layer is models["A"].model.layers[1] for hop in layers)
    many = {p.data_ptr() for p in stacked.model.parameters()}
    assert many == one  # no new storage however often a layer repeats
    owned = {p.data_ptr() for m in models.values() for p in m.parameters()}
    assert many <= owned
    stacked.set_path(PATH)
    q = stacked.model.model.layers[2].layer.self_attn.q_proj.weight
    assert q.data_ptr() == models["A"].model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert stacked.model.model.embed_tokens is models["A"].model.embed_tokens
    assert stacked.model.lm_head is models["A"].lm_head


def test_set_path_equals_a_fresh_build_and_identity_path_is_the_base(family):
    models = sources(family)
    stacked = StackedModel(models, [("A", i) for i in range(4)])
    model = stacked.model
    assert torch.equal(logits(model, IDS), logits(models["A"], IDS))
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    for path in random_paths(3, seed=1):
        assert stacked.set_path(path) is model
        fresh = StackedModel(models, path).model
        assert torch.equal(logits(model, IDS), logits(fresh, IDS))
    assert not torch.equal(logits(model, IDS), logits(models["A"], IDS))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ([], "a path with no layers"),
        ([("A", 4)], "layer index 4 is out of range for A, which has 4 layers"),
        ([("A", 0), ("B", -1)], "hop 1 .* layer index -1 is out of range for B"),
        ([("A", 1.5)], "layer index 1.5 is out of range for A"),
        ([("C", 0)], "unknown model 'C' \\(known: A, B\\)"),
        ([("A", 0, 0.0)], "scale 0.0 must be a finite positive number"),
        ([("A", 0, -2.0)], "scale -2.0 must be a finite positive number"),
        ([("A", 0, float("nan"))], "scale nan must be"),
        ([("A", 0, float("inf"))], "scale inf must be"),
        ([("A", 0, "2")], "scale '2' must be"),
    ],
)
def test_bad_paths_are_one_line_errors(family, tmp_path, path, message):
    models = sources(family)
    dirs = {"A": family.base, "B": family.experts[0]}
    calls = [
        lambda: StackedModel(models, path),
        lambda: StackedModel(models, [("A", 0)]).set_path(path),
        lambda: export_state_dict(models, path),
        lambda: write_checkpoint(dirs, path, tmp_path / "out"),
    ]
    for call in calls:
        with pytest.raises(MergeError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_incompatible_models_are_one_line_errors(tmp_path):
    llama = build_tiny_family(tmp_path / "l", arch="llama", n_experts=1)
    mistral = build_tiny_family(tmp_path / "m", arch="mistral", n_experts=1)
    a = load(llama.base)
    wide = type(a)(type(a.config)(**{**a.config.to_dict(), "hidden_size": 64, "head_dim": 16}))
    cases = [
        ({"A": a, "B": load(mistral.base)}, "LlamaForCausalLM .* MistralForCausalLM"),
        ({"A": a, "B": wide}, r"hidden size 32\), B is LlamaForCausalLM \(hidden size 64\)"),
    ]
    for models, message in cases:
        with pytest.raises(MergeError, match="different architectures or hidden sizes") as info:
            StackedModel(models, [("A", 0)])
        assert "\n" not in str(info.value)
        assert info.match(message), message
    with pytest.raises(MergeError, match="different architectures") as info:
        write_checkpoint({"A": llama.base, "B": mistral.base}, [("A", 0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lm_eval_scores_the_stacked_model_like_its_export(family, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    out = write_checkpoint({"A": family.base, "B": family.experts[0]}, PATH, tmp_path / "out")
    stacked = StackedModel(sources(family, rms_norm_eps=0.0), PATH)
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    scores = [("12+3=", "15"), ("abc", " de")]
    prompt = ("1+1=", {"until": ["."], "max_gen_toks": 8, "do_sample": False})
    results = []
    for model in (stacked.model, load(out, rms_norm_eps=0.0)):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=2)
        likelihoods = lm.loglikelihood(
            [Instance("loglikelihood", {}, args, i) for i, args in enumerate(scores)],
            disable_tqdm=True,
        )
        text = lm.generate_until([Instance("generate_until", {}, prompt, 0)], disable_tqdm=True)
        results.append(([ll for ll, _ in likelihoods], text))
    (got, got_text), (want, want_text) = results
    assert got == pytest.approx(want, abs=ATOL_EXACT) and got_text == want_text
