"""The file merge and the in-memory merge on tiny untrained families: properties, I/O, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from families import build_tiny_family, reshard
from helpers import load_weights as weights
from safetensors.torch import save_file

from evomerge import cli
from evomerge.merge import materialize
from evomerge.merge.errors import MergeError
from evomerge.merge.materialize import run_merge
from evomerge.merge.recipe import parse_recipe
from evomerge.merge.resident import ResidentMerger


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("llama"), arch="llama", seed=0)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("mistral"), arch="mistral", seed=1)




def merge(tmp_path: Path, data: dict, name: str = "out", **kwargs) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    run_merge(parse_recipe(data), out, device="cpu", progress=False, **kwargs)
    return weights(out)


def ties_recipe(family, **params) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [
            {"model": str(e), "parameters": {"weight": 0.5, "density": 0.6, **params}}
            for e in family.experts
        ],
    }


def test_linear_merge_of_identical_models_is_identity(llama, tmp_path):
    expert = str(llama.experts[0])
    source = weights(llama.experts[0])
    for w in ([1.0, 1.0], [0.3, 0.7]):
        data = {
            "merge_method": "linear",
            "models": [
                {"model": expert, "parameters": {"weight": w[0]}},
                {"model": expert + "/", "parameters": {"weight": w[1]}},
            ],
        }
        merged = merge(tmp_path, data, name=f"lin{w[0]}")
        for name, tensor in source.items():
            torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
    exact = merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": expert, "parameters": {"weight": 1.0}},
                {"model": expert + "/", "parameters": {"weight": 1.0}},
            ],
        },
        name="exact",
    )
    assert all(torch.equal(exact[n], t) for n, t in source.items())


def test_task_arithmetic_with_zero_weight_is_the_base(llama, tmp_path):
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(e), "parameters": {"weight": 0.0}} for e in llama.experts],
    }
    merged = merge(tmp_path, data)
    base = weights(llama.base)
    assert merged.keys() == base.keys()
    assert all(torch.equal(merged[n], base[n]) for n in base)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_merged_model_loads_and_generates(arch, llama, mistral, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = llama if arch == "llama" else mistral
    out = tmp_path / "merged"
    run_merge(parse_recipe(ties_recipe(family)), out, device="cpu", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("ab", return_tensors="pt").input_ids
    assert ids.shape[1] > 0
    generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "evomerge_recipe.yaml",
        "README.md",
        "generation_config.json",
        "tokenizer_config.json",
    } <= files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_model_card_has_hub_metadata(llama, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "merged"
    run_merge(parse_recipe(ties_recipe(llama)), out, device="cpu", progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert set(card.data.tags) == {"merge", "evomerge"}
    assert card.data.base_model is None  # local sources have no Hub id
    assert "merge_method: ties" in card.text
    recipe = parse_recipe(__import__("yaml").safe_load((out / "evomerge_recipe.yaml").read_text()))
    assert recipe == parse_recipe(ties_recipe(llama))


def test_model_card_lists_hub_ids(llama):
    from evomerge.merge.card import model_card
    from evomerge.merge.plan import build_plan

    plan = build_plan(parse_recipe(ties_recipe(llama)))
    plan.checkpoints = {
        "org/base@rev1": plan.checkpoints[str(llama.base)],
        "org/x": None,
        str(llama.experts[0]): None,
    }
    text = model_card(plan, "merge_method: ties\n", 0, "m")
    from huggingface_hub import ModelCard

    assert ModelCard(text).data.base_model == ["org/base", "org/x"]


def test_sharded_input_and_output(llama, tmp_path):
    sharded = tmp_path / "sharded_base"
    reshard(llama.base, sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    expected = merge(tmp_path, ties_recipe(llama), name="single")
    data = ties_recipe(llama)
    data["base_model"] = str(sharded)
    out = tmp_path / "multi"
    run_merge(parse_recipe(data), out, device="cpu", progress=False, out_shard_size="30KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    got = weights(out)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in got.values()
    )
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(
        model.state_dict()["model.norm.weight"], expected["model.norm.weight"]
    )


def test_interrupted_merge_leaves_nothing_and_keeps_old_output(llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls = {"n": 0}
    original = materialize.compute_task

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(materialize, "compute_task", failing)
    with pytest.raises(KeyboardInterrupt):
        run_merge(
            parse_recipe(ties_recipe(llama)), out, device="cpu", progress=False, overwrite=True
        )
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_output(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_merge(parse_recipe(ties_recipe(llama)), out, device="cpu", progress=False, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("where", ["a source", "the sources' parent", "inside a source"])
def test_overwrite_never_touches_an_input(tiny_family, where):
    """`--overwrite` with OUT a source folder, above the sources or inside one is refused before
    anything is written: every input file keeps its bytes."""
    family = tiny_family(seed=5)
    out = {
        "a source": family.experts[0],
        "the sources' parent": family.base.parent,
        "inside a source": family.base / "merged",
    }[where]
    before = {p: p.read_bytes() for p in family.base.parent.rglob("*") if p.is_file()}
    with pytest.raises(MergeError, match="input model folder") as err:
        run_merge(parse_recipe(ties_recipe(family)), out, progress=False, overwrite=True)
    assert "\n" not in str(err.value)
    after = {p: p.read_bytes() for p in family.base.parent.rglob("*") if p.is_file()}
    assert after == before and not (family.base / "merged").exists()


def test_a_merge_that_gives_nan_fails_naming_the_tensor_and_writes_nothing(llama, tmp_path):
    """Linear weights that sum to zero divide by zero: no checkpoint of NaNs, exit 2."""
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(llama.experts[0]), "parameters": {"weight": 1.0}},
                {"model": str(llama.experts[1]), "parameters": {"weight": -1.0}},
            ],
        }
    )
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="non-finite values") as err:
        run_merge(recipe, out, device="cpu", progress=False)
    assert str(err.value).startswith("model.") and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_passthrough_frankenmerge_patches_config(llama, tmp_path):
    base, expert = str(llama.base), str(llama.experts[0])
    data = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 3]}]},
            {"sources": [{"model": expert, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]},
            {"sources": [{"model": base, "layer_range": [2, 4]}]},
        ],
    }
    out = tmp_path / "stack"
    run_merge(parse_recipe(data), out, device="cpu", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    got = weights(out)
    b, e = weights(llama.base), weights(llama.experts[0])
    q = "self_attn.q_proj.weight"
    assert torch.equal(got[f"model.layers.2.{q}"], b[f"model.layers.2.{q}"])
    assert torch.equal(got[f"model.layers.3.{q}"], e[f"model.layers.1.{q}"] * 0.5)
    assert torch.equal(got[f"model.layers.7.{q}"], b[f"model.layers.3.{q}"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])  # from the last slice
    assert sum(".self_attn.q_proj.weight" in n for n in got) == 8


def test_resident_merge_equals_file_merge_without_reallocating(llama, tmp_path):
    data = ties_recipe(llama)
    data["merge_method"] = "dare_ties"
    recipe = parse_recipe(data)
    merger = ResidentMerger(recipe, device="cpu", seed=7)
    model = merger.build_model()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    expected = merge(tmp_path, data, name="dare", seed=7)
    state = model.state_dict()
    assert all(torch.equal(state[n], expected[n]) for n in expected)

    data["models"][0]["parameters"]["weight"] = 0.9
    merger.materialize(model, parse_recipe(data))
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters()}
    changed = merge(tmp_path, data, name="dare2", seed=7)
    state = model.state_dict()
    assert all(torch.equal(state[n], changed[n]) for n in changed)
    assert not torch.equal(
        changed["model.layers.0.mlp.up_proj.weight"], expected["model.layers.0.mlp.up_proj.weight"]
    )


def test_resident_merge_rejects_a_method_its_inputs_cannot_make(llama):
    """Task-vector methods share the resident base and deltas (test_baselines.py switches
    among them); any other method needs other inputs."""
    merger = ResidentMerger(parse_recipe(ties_recipe(llama)), device="cpu")
    data = ties_recipe(llama)
    data["merge_method"] = "linear"
    with pytest.raises(MergeError, match="a resident ties merger cannot make a linear merge"):
        merger.set_recipe(parse_recipe(data, warn=lambda _: None))
    data = ties_recipe(llama)
    data["models"] = data["models"][:1]
    with pytest.raises(MergeError, match="must keep the models"):
        merger.set_recipe(parse_recipe(data))


def test_auto_device_on_cpu_matches_cpu(llama, tmp_path):
    a = merge(tmp_path, ties_recipe(llama), name="cpu")
    out = tmp_path / "auto"
    run_merge(parse_recipe(ties_recipe(llama)), out, device="auto", progress=False)
    b = weights(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_merge_matches_cpu(llama, tmp_path):
    a = merge(tmp_path, ties_recipe(llama), name="cpu")
    out = tmp_path / "gpu"
    run_merge(parse_recipe(ties_recipe(llama)), out, device="cuda", progress=False)
    b = weights(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_chat_template_builtin_is_written(llama, tmp_path):
    from transformers import AutoTokenizer

    data = ties_recipe(llama)
    data["chat_template"] = "chatml"
    out = tmp_path / "chat"
    run_merge(parse_recipe(data), out, device="cpu", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


CONVERSATIONS = [
    [{"role": "user", "content": "hi there "}],
    [{"role": "system", "content": " be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
     {"role": "user", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "q"}, {"role": "user_context", "content": "ctx"}],
]  # fmt: skip


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "mistral", "exaone"])
def test_builtin_chat_templates_render_as_mergekits(name, llama):
    """Each built-in template renders what mergekit 0.1.5's file of that name renders, through
    transformers, for every conversation and with and without the generation prompt (errors
    for conversations a template refuses included)."""
    import importlib.resources

    from mergekit._data import chat_templates
    from transformers import AutoTokenizer

    from evomerge.merge.chat_template import BUILTIN

    tokenizer = AutoTokenizer.from_pretrained(llama.base)
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()

    def render(template: str, conversation: list, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False, add_generation_prompt=prompt
            )
        except Exception as exc:  # a template's raise_exception: the same message is expected
            return f"error: {exc}"

    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            assert render(BUILTIN[name], conversation, prompt) == render(
                theirs, conversation, prompt
            ), (conversation, prompt)


def test_chat_template_auto_without_source_templates_merges_without_one(llama, tmp_path, capsys):
    """mergekit merges such a recipe and writes no template; so does evomerge, with a warning."""
    data = ties_recipe(llama)
    data["chat_template"] = "auto"
    out = tmp_path / "auto"
    run_merge(parse_recipe(data), out, device="cpu", progress=False)
    assert not (out / "chat_template.jinja").exists()
    assert "auto found no chat template in any source model; merging without one" in (
        capsys.readouterr().err
    )


def test_pickled_weights_need_the_flag(llama, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for file in llama.experts[0].iterdir():
        if file.suffix != ".safetensors":
            (legacy / file.name).write_bytes(file.read_bytes())
    torch.save(weights(llama.experts[0]), legacy / "pytorch_model.bin")
    data = {
        "merge_method": "linear",
        "models": [{"model": str(legacy), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(MergeError, match=r"pickled \.bin.*--allow-pickle"):
        run_merge(parse_recipe(data), tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    merged = merge(tmp_path, data, name="ok", allow_pickle=True)
    source = weights(llama.experts[0])
    assert all(torch.equal(merged[n], source[n]) for n in source)


# --- the command line: every bad input is one line on stderr, exit 2, nothing written ---


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


def test_cli_merge_succeeds(llama, tmp_path, monkeypatch, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ties_recipe(llama)))
    monkeypatch.setattr(
        sys, "argv", ["evomerge", "merge", str(recipe), str(tmp_path / "o"), "--device", "cpu"]
    )
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code in (0, None)
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_cli_merge_warns_about_what_mergekit_ignores(llama, tmp_path, monkeypatch, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**ties_recipe(llama), "dype": "bfloat16"}))
    code, err = run_cli(["merge", str(recipe), str(tmp_path / "o"), "--device", "cpu"],
                        monkeypatch, capsys)  # fmt: skip
    assert code in (0, None) and (tmp_path / "o" / "model.safetensors").is_file()
    warning = f"warning: {recipe}: dype: not a recipe key (did you mean dtype?); mergekit ignores"
    assert warning in err


def _bad_cases(llama, mistral, tmp_path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (recipe text, expected message part, extra args)."""
    base, e1 = str(llama.base), str(llama.experts[0])
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text((llama.base / "config.json").read_text())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama.base / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text((llama.base / "config.json").read_text())
    tensors = weights(llama.base)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, wide / "model.safetensors")
    ties = (
        "merge_method: ties\nbase_model: {base}\n"
        "models:\n  - model: {m}\n    parameters: {{weight: 1}}\n"
    )
    return {
        "malformed": ("merge_method: ties\nmodels: [\n", "malformed YAML", []),
        "method": (f"merge_method: tiez\nmodels: [{{model: {e1}}}]\n", "unknown method 'tiez'", []),
        "parameter": (
            ties.format(base=base, m=e1).replace("weight", "wieght"),
            "parameters.wieght: ties takes no such parameter (did you mean weight?); remove it",
            ["--strict"],
        ),
        "no_safetensors": (ties.format(base=base, m=empty), "no *.safetensors weights", []),
        "pickle": (ties.format(base=base, m=pickled), "--allow-pickle", []),
        "shapes": (ties.format(base=base, m=wide), "model.layers.0.mlp.up_proj.weight: shape", []),
        "architectures": (
            ties.format(base=base, m=mistral.experts[0]),
            "different architectures",
            [],
        ),
        "layer_range": (
            f"merge_method: passthrough\nslices: [{{sources: [{{model: {e1}, "
            "layer_range: [2, 9]}]}]\n",
            "layer_range: [2, 9] is out of range",
            [],
        ),
        "exists": (ties.format(base=base, m=e1), "already exists; pass --overwrite", ["exists"]),
        "hub_offline": (ties.format(base=base, m="nobody/nothing-here"), "HF_HUB_OFFLINE", []),
        "missing_recipe": ("", "cannot read recipe", ["missing"]),
    }


BAD_CASES = [
    "malformed", "method", "parameter", "no_safetensors", "pickle", "shapes", "architectures",
    "layer_range", "exists", "hub_offline", "missing_recipe",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_CASES)
def test_cli_bad_inputs(name, llama, mistral, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = _bad_cases(llama, mistral, tmp_path)
    assert sorted(cases) == sorted(BAD_CASES)
    text, expected, extra = cases[name]
    work = tmp_path / name
    work.mkdir()
    recipe = work / "recipe.yaml"
    if "missing" not in extra:
        recipe.write_text(text)
    out = work / "out"
    if "exists" in extra:
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    flags = [x for x in extra if x.startswith("--")]
    code, err = run_cli(
        ["merge", str(recipe), str(out), "--device", "cpu", *flags], monkeypatch, capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    if "exists" in extra:
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in work.iterdir()) == sorted(
        ["recipe.yaml", "out"][: 1 + ("exists" in extra)] if "missing" not in extra else []
    )
