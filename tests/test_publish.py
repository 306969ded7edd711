"""`evomerge publish`: checks before upload, the completed card, staging, and the upload call.

Offline: every HfApi method that writes is replaced, and sources are local folders (Hub sources
are tested through the metadata and license functions with a fake card loader)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from families import build_tiny_family
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file, save_file

from evomerge.merge.errors import MergeError
from evomerge.merge.materialize import run_merge
from evomerge.merge.recipe import parse_recipe
from evomerge.publish import card_data, publish, resolve_license
from evomerge.search.records import ModelScores

REPO = "someone/tiny-merge"
FAKE_TOKEN = "hf_FAKE_TOKEN_123456789"
PLOT_FILES = ["fitness.png", "best_parameters.png", "scores.png"]


def _write_card(folder: Path, license: str | None) -> None:
    front = f"---\nlicense: {license}\n---\n" if license else ""
    (folder / "README.md").write_text(f"{front}# {folder.name}\n")


def _merge(family, out: Path, shard_size: str = "40KB") -> Path:
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(family.base),
            "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in family.experts],
            "dtype": "float32",
        }
    )
    return run_merge(recipe, out, out_shard_size=shard_size, progress=False)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A sharded merge of a tiny family whose sources' cards all say apache-2.0."""
    root = tmp_path_factory.mktemp("publish")
    family = build_tiny_family(root / "family")
    for folder in (family.base, *family.experts):
        _write_card(folder, "apache-2.0")
    out = _merge(family, root / "merged")
    assert len(list(out.glob("*.safetensors"))) > 2  # sharded, with an index
    return out


@pytest.fixture
def model_dir(merged, tmp_path) -> Path:
    return Path(shutil.copytree(merged, tmp_path / "model"))


@pytest.fixture(autouse=True)
def no_hub_writes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the Hub")

    for name in ("create_repo", "upload_folder", "upload_large_folder"):
        monkeypatch.setattr(HfApi, name, refuse, raising=False)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def _rewrite_shard(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _drop_from_index(folder: Path, tensor: str) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["weight_map"][tensor]
    path.write_text(json.dumps(index))


def _dry_run(folder: Path, **kwargs):
    lines: list[str] = []
    plan = publish(folder, REPO, dry_run=True, echo=lines.append, **kwargs)
    return plan, "\n".join(lines)


# --- dry run and the card ----------------------------------------------------------------------


def test_dry_run_lists_files_and_card_and_changes_nothing(model_dir):
    before = _snapshot(model_dir)
    plan, output = _dry_run(model_dir)

    expected = {p.name for p in model_dir.iterdir()}  # README.md is replaced, not added
    assert {name for name, _ in plan.files} == expected
    for name, size in plan.files:
        if name != "README.md":
            assert size == (model_dir / name).stat().st_size
        assert name in output and f"{size:,d} B" in output
    assert dict(plan.files)["README.md"] == len(plan.card.encode())
    assert plan.card.strip() in output and "nothing was uploaded" in output

    card = ModelCard(plan.card)
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers"
    assert {"merge", "evomerge"} <= set(card.data.tags)
    assert card.data.base_model is None  # every source is a local folder
    assert "merge_method: task_arithmetic" in card.text and "```yaml" in card.text
    assert f"evomerge reproduce {REPO} --verify" in card.text
    recipe = (model_dir / "evomerge_recipe.yaml").read_text()
    assert recipe.rstrip() in card.text
    for source in ["base", "expert_1", "expert_2"]:
        assert f"/{source}`" in card.text  # local sources listed in the body
    assert any("not on the Hub" in w for w in plan.warnings)

    assert not plan.folder.exists()  # staging removed
    assert plan.url is None
    assert _snapshot(model_dir) == before


def test_card_data_takes_hub_ids_keeps_other_metadata(tmp_path):
    local = tmp_path / "local_model"
    local.mkdir()
    data = card_data(
        ["org/base", "org/expert@0123abc", str(local), "org/base"],
        {"license": "mit"},
        existing={"language": ["en"], "license": "gpl-3.0", "tags": ["custom"]},
    )
    parsed = ModelCard(f"---\n{data.to_yaml()}\n---\nbody\n").data
    assert parsed.base_model == ["org/base", "org/expert"]
    assert parsed.base_model_relation == "merge"
    assert parsed.license == "mit"
    assert parsed.library_name == "transformers"
    assert parsed.tags[0] == "custom" and {"merge", "evomerge"} <= set(parsed.tags)
    assert parsed.language == ["en"]

    only_local = card_data([str(local)], {}).to_dict()
    assert "base_model" not in only_local and "license" not in only_local


def test_hub_source_licenses_and_offline_sources(monkeypatch, tmp_path):
    cards = {"org/a": "mit", "org/b": "mit", "org/c": "apache-2.0"}

    def fake_load(repo_id, **kwargs):
        if repo_id not in cards:
            raise OSError("offline")
        return ModelCard(f"---\nlicense: {cards[repo_id]}\n---\n")

    monkeypatch.setattr(ModelCard, "load", fake_load)
    warnings: list[str] = []
    assert resolve_license(["org/a", "org/offline", "org/b"], None, warnings) == {"license": "mit"}
    assert len(warnings) == 1 and "org/offline" in warnings[0]

    with pytest.raises(MergeError) as err:
        resolve_license(["org/a", "org/c"], None, [])
    message = str(err.value)
    assert "org/a: mit" in message and "org/c: apache-2.0" in message
    assert "--license" in message and "\n" not in message
    assert resolve_license(["org/a", "org/c"], "llama3", []) == {"license": "llama3"}

    no_card = tmp_path / "no_card"
    no_card.mkdir()
    warnings = []
    assert resolve_license([str(no_card)], None, warnings) == {}
    assert any(str(no_card) in w for w in warnings)
    assert any("--license" in w for w in warnings)


def test_conflicting_source_licenses_need_license_option(tmp_path):
    family = build_tiny_family(tmp_path / "family")
    _write_card(family.base, "apache-2.0")
    _write_card(family.experts[0], "apache-2.0")
    _write_card(family.experts[1], "mit")
    out = _merge(family, tmp_path / "merged", shard_size="5GB")

    with pytest.raises(MergeError) as err:
        _dry_run(out)
    message = str(err.value)
    assert "apache-2.0" in message and "mit" in message and "--license" in message
    assert str(family.experts[1]) in message

    plan, _ = _dry_run(out, license="mit")
    assert ModelCard(plan.card).data.license == "mit"
    assert "model.safetensors" in dict(plan.files)  # the single-file layout


# --- checks before upload ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "extra/optimizer.pt", "state.pkl"])
def test_pickled_file_is_refused(model_dir, name):
    (model_dir / name).parent.mkdir(exist_ok=True)
    (model_dir / name).write_bytes(b"not really a pickle")
    with pytest.raises(MergeError, match="pickled") as err:
        _dry_run(model_dir)
    assert str(model_dir / name) in str(err.value)


def test_shard_outside_the_index_is_refused(model_dir):
    save_file({"stray": torch.zeros(2)}, model_dir / "model-extra.safetensors")
    with pytest.raises(MergeError, match="does not name") as err:
        _dry_run(model_dir)
    assert "model-extra.safetensors" in str(err.value)


def test_index_naming_a_missing_shard_is_refused(model_dir):
    shard = _shard_of(model_dir, "model.norm.weight")
    shard.unlink()
    with pytest.raises(MergeError, match="not in") as err:
        _dry_run(model_dir)
    assert shard.name in str(err.value) and "model.safetensors.index.json" in str(err.value)


def test_tensor_missing_from_the_index_is_refused(model_dir):
    _drop_from_index(model_dir, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(MergeError) as err:
        _dry_run(model_dir)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "lacks it" in str(err.value)


def test_tensor_with_a_wrong_shape_is_refused(model_dir):
    shard = _shard_of(model_dir, "model.layers.2.self_attn.k_proj.weight")

    def shrink(tensors):
        tensors["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    _rewrite_shard(shard, shrink)
    with pytest.raises(MergeError) as err:
        _dry_run(model_dir)
    message = str(err.value)
    assert "model.layers.2.self_attn.k_proj.weight" in message and shard.name in message
    assert "[8, 32]" in message and "[16, 32]" in message


@pytest.mark.parametrize("tied", [True, False])
def test_absent_lm_head_passes_only_with_tied_embeddings(model_dir, tied):
    config = json.loads((model_dir / "config.json").read_text())
    config["tie_word_embeddings"] = tied
    (model_dir / "config.json").write_text(json.dumps(config))
    _rewrite_shard(_shard_of(model_dir, "lm_head.weight"), lambda t: t.pop("lm_head.weight"))
    _drop_from_index(model_dir, "lm_head.weight")
    if tied:
        plan, _ = _dry_run(model_dir)
        assert plan.files
    else:
        with pytest.raises(MergeError, match=r"lm_head\.weight"):
            _dry_run(model_dir)


def test_stray_large_file_is_refused_tokenizer_is_not(model_dir):
    big = b"\0" * 6_000_000
    (model_dir / "tokenizer.json").write_bytes(big)  # large tokenizers are normal
    plan, _ = _dry_run(model_dir)
    assert dict(plan.files)["tokenizer.json"] == len(big)

    (model_dir / "backup.tar.gz").write_bytes(big)
    with pytest.raises(MergeError, match="not a weight shard") as err:
        _dry_run(model_dir)
    assert str(model_dir / "backup.tar.gz") in str(err.value)


def test_folder_problems_are_one_line_errors(model_dir, tmp_path):
    with pytest.raises(MergeError, match="user/name"):
        publish(model_dir, "no-namespace", dry_run=True, echo=lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match=r"no config\.json"):
        _dry_run(tmp_path / "empty")
    (model_dir / "evomerge_recipe.yaml").unlink()
    with pytest.raises(MergeError, match=r"evomerge_recipe\.yaml"):
        _dry_run(model_dir)


# --- search outputs ----------------------------------------------------------------------------


def _fake_search(merged: Path, root: Path) -> Path:
    shutil.copytree(merged, root / "model")
    scores = [
        ModelScores("base", "source", {"combo": (0.64, 0.028)}, {"combo_heldout": (0.62, 0.029)}),
        ModelScores(
            "best merge",
            "best",
            {"combo": (0.8733, 0.0192)},
            {"combo_heldout": (0.8933, 0.0179)},
            0.8733,
            0.8933,
            0.0179,
        ),
    ]
    (root / "scores.json").write_text(json.dumps([s.to_dict() for s in scores]))
    for name in PLOT_FILES:
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    for name in ("report.md", "study.db", "trials.csv", "best_recipe.yaml"):
        (root / name).write_text("local search record\n")
    return root


def test_search_output_publishes_model_plots_and_scores(merged, tmp_path):
    root = _fake_search(merged, tmp_path / "run")
    plan, output = _dry_run(root)

    names = dict(plan.files)
    for name in [*PLOT_FILES, "scores.json", "config.json", "model.safetensors.index.json"]:
        assert name in names and name in output
    for name in ("report.md", "study.db", "trials.csv", "best_recipe.yaml", "model/config.json"):
        assert name not in names
    assert names["fitness.png"] == (root / "fitness.png").stat().st_size
    assert plan.model_dir == root / "model"

    for name in PLOT_FILES:
        assert f"]({name})" in plan.card
    assert "pareto.png" not in plan.card  # not drawn, not linked
    assert "0.8933 ± 0.0179" in plan.card and "0.6400 ± 0.0280" in plan.card
    assert "## Search" in plan.card
    assert ModelCard(plan.card).data.license == "apache-2.0"


def test_malformed_scores_file_is_refused(merged, tmp_path):
    root = _fake_search(merged, tmp_path / "run")
    (root / "scores.json").write_text('{"not": "a list"}')
    with pytest.raises(MergeError, match=r"scores\.json"):
        _dry_run(root)


# --- upload ------------------------------------------------------------------------------------


def test_upload_calls_the_hub_and_never_exposes_the_token(merged, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    root = _fake_search(merged, tmp_path / "run")
    before = _snapshot(root)
    calls: dict[str, dict] = {}
    staged: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        folder = Path(kwargs["folder_path"])
        for path in folder.rglob("*"):
            if path.is_file():
                staged[path.relative_to(folder).as_posix()] = path.read_bytes()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    plan = publish(root, REPO, private=True)

    assert calls["create_repo"] == {
        "repo_id": REPO,
        "private": True,
        "repo_type": "model",
        "exist_ok": True,
    }
    assert calls["upload_folder"]["repo_id"] == REPO
    assert calls["upload_folder"]["repo_type"] == "model"
    assert Path(calls["upload_folder"]["folder_path"]) == plan.folder
    assert set(staged) == {name for name, _ in plan.files}
    assert staged["README.md"].decode() == plan.card
    assert staged["scores.json"] == (root / "scores.json").read_bytes()
    assert plan.url == f"https://huggingface.co/{REPO}"

    out, err = capsys.readouterr()
    assert plan.url in out
    token = FAKE_TOKEN.encode()
    assert FAKE_TOKEN not in out + err
    assert FAKE_TOKEN not in repr(plan) and FAKE_TOKEN not in repr(calls)
    assert not [name for name, data in staged.items() if token in data]
    assert not plan.folder.exists()
    assert _snapshot(root) == before


def test_upload_failure_is_a_one_line_error(model_dir, monkeypatch):
    def create_repo(self, repo_id, **kwargs):
        raise OSError("401 Client Error: Unauthorized\nmore detail")

    staging: list[Path] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(**kwargs):
        staging.append(Path(mkdtemp(**kwargs)))
        return str(staging[-1])

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    with pytest.raises(MergeError) as err:
        publish(model_dir, REPO, echo=lambda _: None)
    message = str(err.value)
    assert "\n" not in message and "Unauthorized" in message and "hf auth login" in message
    assert len(staging) == 1 and not staging[0].exists()


def test_a_file_linking_out_of_the_folder_is_never_uploaded(model_dir, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (model_dir / "notes.txt").symlink_to(secret)
    with pytest.raises(MergeError, match=r"is a link to .*outside") as err:
        _dry_run(model_dir)
    assert "hf_secret" not in str(err.value)


def test_a_file_name_with_a_newline_is_refused(model_dir):
    (model_dir / "notes\nREADME.md 1 kB").write_text("x")
    with pytest.raises(MergeError, match="control character") as err:
        _dry_run(model_dir)
    assert "\n" not in str(err.value)


def test_an_index_whose_shards_lie_outside_the_folder_is_refused(model_dir, tmp_path):
    """Every shard moved out and the index pointed at it: the folder would be published with no
    weights at all (and the outside files read)."""
    index_file = model_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for shard in set(index["weight_map"].values()):
        (model_dir / shard).rename(outside / shard)
    index["weight_map"] = {k: f"../elsewhere/{v}" for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(MergeError, match="outside") as err:
        _dry_run(model_dir)
    assert "\n" not in str(err.value)
