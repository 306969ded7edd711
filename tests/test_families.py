"""The tiny untrained test families and the trained demo family."""

from __future__ import annotations

import json
from pathlib import Path

import build_family as demo
import pytest
import torch
from families import EXTRA_PER_EXPERT, build_tiny_family, reshard
from helpers import load_weights as weights
from transformers import AutoModelForCausalLM, AutoTokenizer

DEMO_DATA = Path(__file__).resolve().parents[1] / "evals" / "tasks" / "demo" / "data"




def file_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# --- tiny families ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_tiny_family_loads_and_generates(arch, tiny_family):
    family = tiny_family(arch=arch, n_experts=3)
    assert family.arch == arch
    assert [p.name for p in family.experts] == ["expert_1", "expert_2", "expert_3"]
    for folder in (family.base, *family.experts):
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == [f"{arch.capitalize()}ForCausalLM"]
        assert config["dtype"] == "float32"
        assert not config["tie_word_embeddings"]
        assert (folder / "generation_config.json").is_file()
        assert not list(folder.glob("*.bin"))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("ab 12+3=", return_tensors="pt").input_ids
        assert ids.shape[1] == 9  # <s> and one id per character
        assert tokenizer.unk_token_id not in ids[0].tolist()
        assert tokenizer.decode(ids[0], skip_special_tokens=True) == "ab 12+3="
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == config["architectures"][0]
        out = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        assert out.shape == (1, ids.shape[1] + 5)


def test_same_seed_is_byte_identical_and_seeds_differ(tmp_path):
    first = build_tiny_family(tmp_path / "a", seed=3, extra_vocab=True)
    again = build_tiny_family(tmp_path / "b", seed=3, extra_vocab=True)
    other = build_tiny_family(tmp_path / "c", seed=4, extra_vocab=True)
    for x, y, z in zip(
        (first.base, *first.experts),
        (again.base, *again.experts),
        (other.base, *other.experts),
        strict=True,
    ):
        assert file_bytes(x) == file_bytes(y)
        assert (x / "model.safetensors").read_bytes() != (z / "model.safetensors").read_bytes()


def test_building_leaves_the_global_rng_alone(tmp_path):
    state = torch.random.get_rng_state()
    build_tiny_family(tmp_path / "f", arch="mistral")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_task_vectors_conflict_in_sign_and_differ_in_size(tiny_family):
    family = tiny_family(n_experts=3, seed=1)
    base = weights(family.base)
    deltas = [{k: v - base[k] for k, v in weights(e).items()} for e in family.experts]
    name = "model.layers.1.mlp.up_proj.weight"
    d1, d2, d3 = (d[name] for d in deltas)
    assert all(d.abs().min() > 0 for d in (d1, d2, d3)), "every tensor is perturbed"
    assert 0.6 < (d1.sign() != d2.sign()).float().mean() < 0.9  # mostly opposed
    assert (d1.sign() != d3.sign()).float().mean() < 0.4  # mostly agreeing
    assert d1.abs().mean() < d2.abs().mean() < d3.abs().mean()
    assert set(deltas[0]) == set(base)


def test_extra_vocab_experts_have_their_own_tokens_and_rows(tiny_family):
    family = tiny_family(n_experts=2, seed=1, extra_vocab=True)
    base_vocab = AutoTokenizer.from_pretrained(family.base).get_vocab()
    base_weights = weights(family.base)
    extras = []
    for expert in family.experts:
        tokenizer = AutoTokenizer.from_pretrained(expert)
        vocab = tokenizer.get_vocab()
        extra = set(vocab) - set(base_vocab)
        assert len(extra) == EXTRA_PER_EXPERT
        assert all(vocab[t] == i for t, i in base_vocab.items()), "base ids are kept"
        assert sorted(vocab[t] for t in extra) == list(range(len(base_vocab), len(vocab)))
        for token in extra:
            assert tokenizer(token, add_special_tokens=False).input_ids == [vocab[token]]
        tensors = weights(expert)
        config = json.loads((expert / "config.json").read_text())
        assert config["vocab_size"] == len(vocab)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert tensors[name].shape == (len(vocab), base_weights[name].shape[1])
        model = AutoModelForCausalLM.from_pretrained(expert)
        ids = tokenizer("ab" + "".join(sorted(extra)), return_tensors="pt").input_ids
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
        extras.append(extra)
    assert not extras[0] & extras[1]


def test_reshard_covers_every_tensor(tiny_family, tmp_path):
    family = tiny_family()
    out = tmp_path / "sharded"
    reshard(family.base, out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert set(index["weight_map"].values()) == set(shards)
    original, resharded = weights(family.base), weights(out)
    assert set(index["weight_map"]) == set(original) == set(resharded)
    for name, tensor in original.items():
        assert torch.equal(resharded[name], tensor), name
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab()
        == AutoTokenizer.from_pretrained(family.base).get_vocab()
    )
    AutoModelForCausalLM.from_pretrained(out)


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        build_tiny_family(tmp_path, arch="qwen2")


# --- demo family: pure helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "roman"), [(1, "i"), (4, "iv"), (9, "ix"), (14, "xiv"), (40, "xl"), (99, "xcix"),
                     (347, "cccxlvii"), (399, "cccxcix"), (1994, "mcmxciv")],
)  # fmt: skip
def test_to_roman(n, roman):
    assert demo.to_roman(n) == roman


def test_eval_splits_are_disjoint_deterministic_and_numeric():
    splits = demo.make_eval_splits(0, 50)
    assert splits == demo.make_eval_splits(0, 50)
    assert splits != demo.make_eval_splits(1, 50)
    assert set(splits) == set(demo.TASKS)
    for by_split in splits.values():
        fitness = {i.prompt for i in by_split["fitness"]}
        heldout = {i.prompt for i in by_split["heldout"]}
        assert len(fitness) == len(heldout) == 50
        assert not fitness & heldout
        for item in by_split["fitness"] + by_split["heldout"]:
            assert item.answer.isdigit()
            assert demo.answer_of(item.target) == item.answer
    combined = splits["combined"]["fitness"][0]
    a, b = combined.prompt.rstrip("=").split("+")
    assert combined.target.startswith(f"{demo.from_roman(a)}+{demo.from_roman(b)}=")


def test_answer_of_takes_the_last_number():
    assert demo.answer_of("12+34=46") == "46"
    assert demo.answer_of("xlvi") is None
    assert demo.answer_of("") is None


# --- demo family: the trained models ---------------------------------------------------------


@pytest.mark.slow
def test_demo_family_layout(demo_family):
    for name in demo.MODELS:
        folder = demo_family / name
        assert {p.name for p in folder.iterdir()} >= {
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        }
        assert not list(folder.glob("*.bin"))
    for task in (*demo.TASKS, "mixed"):
        rows = {}
        for split in ("fitness", "heldout"):
            lines = (DEMO_DATA / f"{task}_{split}.jsonl").read_text().splitlines()
            rows[split] = [json.loads(line) for line in lines]
            assert len(rows[split]) >= 200
            assert all(r["answer"].isdigit() and r["prompt"] for r in rows[split])
        assert not {r["prompt"] for r in rows["fitness"]} & {r["prompt"] for r in rows["heldout"]}


@pytest.mark.slow
def test_demo_experts_have_distinct_skills(demo_family):
    acc = json.loads((demo_family / "skills.json").read_text())["accuracy"]
    assert set(acc) == set(demo.MODELS)
    a, b, base = acc["expert_a"], acc["expert_b"], acc["base"]
    assert a["skill_a"] >= b["skill_a"] + 0.25
    assert b["skill_b"] >= a["skill_b"] + 0.15
    assert a["skill_a"] > base["skill_a"] and b["skill_b"] > base["skill_b"]
    assert a["skill_a"] >= 0.6 and b["skill_b"] >= 0.8


@pytest.mark.slow
def test_demo_models_reproduce_their_recorded_accuracy(demo_family):
    """The saved checkpoints, loaded through the Auto classes, score what skills.json says."""
    skills = json.loads((demo_family / "skills.json").read_text())
    lines = (DEMO_DATA / "skill_a_heldout.jsonl").read_text().splitlines()
    items = [demo.Item(**json.loads(line)) for line in lines]
    folder = demo_family / "expert_a"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert demo.accuracy(model, tokenizer, items) == pytest.approx(
        skills["accuracy"]["expert_a"]["skill_a"], abs=1e-4
    )


def test_shipped_family_matches_its_manifest_and_loads(demo_family):
    assert demo.manifest_differences(demo_family) == []
    manifest = json.loads((demo_family / demo.MANIFEST).read_text())
    assert set(manifest["built_with"]) >= {"torch", "transformers", "tokenizers", "cpu_capability"}
    for name in demo.MODELS:
        model = AutoModelForCausalLM.from_pretrained(demo_family / name)
        assert model.num_parameters() < 700_000
        assert (demo_family / name / "model.safetensors").stat().st_size < 3_000_000


def test_manifest_check_names_a_changed_missing_or_extra_file(demo_family, tmp_path):
    import shutil

    copy = tmp_path / "family"
    shutil.copytree(demo_family, copy)
    weights_file = copy / "expert_b" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 1
    weights_file.write_bytes(bytes(data))
    (copy / "base" / "tokenizer.json").unlink()
    (copy / "notes.txt").write_text("x")
    assert demo.manifest_differences(copy) == [
        "base/tokenizer.json: missing",
        "notes.txt: not in the manifest",
        "expert_b/model.safetensors: sha256 differs",
    ]
