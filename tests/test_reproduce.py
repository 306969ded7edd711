"""`evomerge reproduce`: rebuilding published merges from their recipes, verified bit for bit.

The "published" merges are made here from the tiny fixture family, by evomerge (`run_merge`,
which writes `evomerge_recipe.yaml` and a model card) and by mergekit 0.1.5 run in-process
(`mergekit_config.yml` and its card); then copied, tampered with or stripped of files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import yaml
from helpers import load_weights, stalled_cli
from mergekit_oracle import run_mergekit
from safetensors.torch import load_file, save_file

from evomerge import reproduce as reproduce_module
from evomerge.merge.errors import MergeError
from evomerge.merge.materialize import RECIPE_FILE, run_merge
from evomerge.merge.recipe import parse_recipe
from evomerge.reproduce import VerifyReport, find_recipe, reproduce

N_TENSORS = 39  # the tiny llama family: embeddings, 4 layers of 9, final norm, lm_head


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronization on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch, tmp_path) -> None:
    """No Hub: offline mode (read at import, so patched too) and an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def recipe(method: str, family, **params: Any) -> dict[str, Any]:
    weights = [0.6, 0.4]
    models = [
        {"model": str(expert), "parameters": {"weight": w, **params}}
        for expert, w in zip(family.experts, weights, strict=True)
    ]
    config: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        config["base_model"] = str(family.base)
    return config


def publish(config: dict[str, Any], folder: Path, seed: int = 0, shard: str = "5GB") -> Path:
    """A merge published by evomerge."""
    parsed = parse_recipe(copy.deepcopy(config))
    return run_merge(parsed, folder, device="cpu", seed=seed, out_shard_size=shard, progress=False)


def publish_with_mergekit(config: dict[str, Any], folder: Path, cli: bool) -> Path:
    """A merge published by mergekit: weights, mergekit_config.yml and its model card.

    `mergekit-yaml` (cli) saves the recipe's own text; mergekit's Python API saves its normalized
    form, `modules: {default: {slices: ...}}`.
    """
    source = yaml.safe_dump(config, sort_keys=False) if cli else None
    return run_mergekit(config, folder, card=True, source=source)


def run(source: Path | str, **kwargs: Any) -> tuple[VerifyReport | None, str]:
    lines: list[str] = []
    report = reproduce(str(source), device="cpu", echo=lines.append, **kwargs)
    return report, "\n".join(lines)


def error_of(source: Path | str, **kwargs: Any) -> str:
    with pytest.raises(MergeError) as info:
        run(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message




def shard_of(folder: Path, name: str) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder / json.loads(index.read_text())["weight_map"][name]
    (file,) = folder.glob("*.safetensors")
    return file


# --------------------------------------------------------------------------------------------
# reproducing


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5})],
)
def test_evomerge_merge_reproduces_bit_exact(tiny_family, tmp_path, method, params):
    family = tiny_family()
    published = publish(recipe(method, family, **params), tmp_path / "pub", seed=7, shard="20KB")
    assert len(list(published.glob("*.safetensors"))) > 1  # sharded, with an index

    report, output = run(published, verify=True)

    assert report is not None and report.passed, output
    assert len(report.rows) == N_TENSORS
    assert {row.result for row in report.rows} == {"ok"}
    assert all(row.published == row.rebuilt for row in report.rows)
    with_seed = ", seed 7" if method == "dare_ties" else ""  # only random methods have one
    assert f"recipe: {published}/{RECIPE_FILE} ({method}{with_seed})\n" in output
    assert "sources have no recorded revisions: using their current versions" in output
    assert f"verify PASSED: {N_TENSORS} tensors: {N_TENSORS} identical" in output


def test_recorded_seed_is_what_reproduces_a_random_merge(tiny_family, tmp_path):
    published = publish(recipe("dare_ties", tiny_family(), density=0.5), tmp_path / "pub", seed=7)
    recipe_file = published / RECIPE_FILE
    header, rest = recipe_file.read_text().split("\n", 1)
    assert header == "# made by evomerge with --seed 7"
    recipe_file.write_text(rest)  # the seed is lost: the rebuild uses 0

    report, output = run(published, verify=True)

    assert report is not None and not report.passed
    assert "no evomerge seed is recorded" in output
    assert all(row.result == "differs" and row.max_abs_diff > 0 for row in report.rows)


@pytest.mark.parametrize(("method", "cli"), [("linear", True), ("task_arithmetic", False)])
def test_mergekit_merge_reproduces_bit_exact(tiny_family, tmp_path, method, cli):
    published = publish_with_mergekit(recipe(method, tiny_family()), tmp_path / "pub", cli)
    saved = yaml.safe_load((published / "mergekit_config.yml").read_text())
    assert ("modules" in saved) is not cli
    assert not (published / RECIPE_FILE).exists()

    report, output = run(published, verify=True)
    assert report is not None and report.passed, output
    assert len(report.rows) == N_TENSORS
    assert f"{published}/mergekit_config.yml ({method})" in output

    # mergekit's model card alone holds the recipe as well
    (published / "mergekit_config.yml").unlink()
    report, output = run(published, verify=True)
    assert report is not None and report.passed, output
    assert f"{published}/README.md (yaml block" in output


def test_recipe_from_readme_with_decoy_blocks_and_seed(tiny_family, tmp_path):
    published = publish(recipe("dare_ties", tiny_family(), density=0.4), tmp_path / "pub", seed=5)
    (published / RECIPE_FILE).unlink()
    card = (published / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    decoys = "```yaml\nlicense: apache-2.0\n```\n\n```yaml\nmerge_method: [\n```\n\n"
    (published / "README.md").write_text(f"{front}\n---\n{decoys}{body}")

    report, output = run(published, verify=True)

    assert report is not None and report.passed, output
    assert f"{published}/README.md (yaml block 3) (dare_ties, seed 5)" in output


def test_recipe_precedence(tmp_path):
    def write(file: str, method: str) -> None:
        text = f"merge_method: {method}\nmodels:\n  - model: a\n  - model: b\n"
        if file == "README.md":
            text = f"# card\n\n```yaml\n{text}```\n"
        (tmp_path / file).write_text(text)

    write(RECIPE_FILE, "linear")
    write("mergekit_config.yml", "ties")
    write("README.md", "model_stock")
    for file, method in [(RECIPE_FILE, "linear"), ("mergekit_config.yml", "ties")]:
        found = find_recipe(tmp_path)
        assert (found.origin, found.recipe.merge_method) == (f"{tmp_path}/{file}", method)
        (tmp_path / file).unlink()
    found = find_recipe(tmp_path)
    assert (found.recipe.merge_method, found.seed) == ("model_stock", None)
    # a block that is a recipe but an invalid one is reported, not skipped
    (tmp_path / "README.md").write_text("```yaml\nmerge_method: linear\nmodels: 3\n```\n")
    with pytest.raises(MergeError, match=r"README.md \(yaml block 1\): models"):
        find_recipe(tmp_path)


def test_out_keeps_the_rebuild_and_the_temporary_one_is_removed(tiny_family, tmp_path, monkeypatch):
    published = publish(recipe("ties", tiny_family(), density=0.5), tmp_path / "pub")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    report, output = run(published, verify=True)
    assert report is not None and report.passed
    assert f"rebuilding into {temp}" in output and "(removed afterwards)" in output
    assert list(temp.iterdir()) == []

    out = tmp_path / "rebuilt"
    report, output = run(published, out=out)
    assert report is None and "verify" not in output and f"wrote {out}" in output
    assert list(temp.iterdir()) == []
    assert (out / RECIPE_FILE).read_text() == (published / RECIPE_FILE).read_text()
    ours, theirs = load_weights(out), load_weights(published)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_rebuild_removes_the_temporary_folder(signum, tiny_family, tmp_path):
    """`reproduce --verify` stopped while it rebuilds (helpers.stalled_cli; the release never
    comes): exit 130 in one line, and its temporary folder is gone."""
    published = publish(recipe("ties", tiny_family(), density=0.5), tmp_path / "pub")
    temp, marker = tmp_path / "tmp", tmp_path / "rebuilding"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1"}
    argv = ["reproduce", str(published), "--verify", "--device", "cpu"]
    process = stalled_cli(argv, marker, tmp_path / "never", env)
    assert [p.name.startswith("evomerge-reproduce-") for p in temp.iterdir()] == [True]
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    last = "interrupted; nothing was written; the temporary rebuild was removed"
    assert "Traceback" not in err and err.strip().splitlines()[-1] == last, err
    assert list(temp.iterdir()) == []


def test_recorded_revisions_are_named(tiny_family, tmp_path):
    family = tiny_family()
    config = recipe("ties", family, density=0.5)
    config["models"][0]["model"] += "@v1"  # a local folder ignores the revision
    published = publish(config, tmp_path / "pub")

    report, output = run(published, verify=True)

    assert report is not None and report.passed
    assert (
        f"sources at their recorded revisions: {family.experts[0]}@v1; "
        f"no recorded revision (current version): {family.base}, {family.experts[1]}"
    ) in output


def test_hub_source_fetches_weights_and_recipe_files(tiny_family, tmp_path, monkeypatch):
    published = publish(recipe("ties", tiny_family(), density=0.5), tmp_path / "pub")
    snapshot = tmp_path / "hub" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    calls = []

    def snapshot_download(repo_id: str, *, revision=None, allow_patterns=(), **_: Any) -> str:
        calls.append((repo_id, revision, list(allow_patterns)))
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in published.iterdir():
            if any(fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy2(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    report, output = run("someone/merged@v1", verify=True)

    assert report is not None and report.passed, output
    assert f"someone/merged@v1/{RECIPE_FILE} (ties)" in output
    (weights_call,) = calls  # one download: weights, card and recipe files together
    assert weights_call[:2] == ("someone/merged", "v1") and "*.bin" not in weights_call[2]
    assert "*.yaml" in weights_call[2] and "*.yml" in weights_call[2]


# --------------------------------------------------------------------------------------------
# verification failures


def test_tampered_checkpoint_is_detected(tiny_family, tmp_path, monkeypatch):
    original = publish(recipe("ties", tiny_family(), density=0.5), tmp_path / "pub", shard="20KB")
    published = shutil.copytree(original, tmp_path / "tampered")
    index_file = published / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    changes = {
        "model.layers.1.mlp.up_proj.weight": "differs",
        "model.layers.2.self_attn.q_proj.weight": "dtype",
        "model.layers.3.self_attn.k_proj.weight": "shape",
        "model.layers.0.input_layernorm.weight": "only rebuilt",
        "model.extra.weight": "only published",
    }
    for name, change in changes.items():
        shard = shard_of(published, "lm_head.weight" if change == "only published" else name)
        tensors = load_file(shard)
        if change == "differs":  # one entry, one unit in the last place
            flat = tensors[name].view(-1)
            flat[5] = torch.nextafter(flat[5], torch.tensor(1.0))
        elif change == "dtype":
            tensors[name] = tensors[name].half()
        elif change == "shape":
            tensors[name] = tensors[name][:-1].clone()
        elif change == "only rebuilt":
            del tensors[name], index["weight_map"][name]
        else:
            tensors[name] = torch.ones(3)
            index["weight_map"][name] = shard.name
        save_file(tensors, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))

    report, output = run(published, verify=True)

    assert report is not None and not report.passed
    assert {row.name: row.result for row in report.failures} == changes
    assert len(report.rows) == N_TENSORS + 1
    rows = {row.name: row for row in report.rows}
    assert 0 < rows["model.layers.1.mlp.up_proj.weight"].max_abs_diff < 1e-6
    assert rows["model.layers.2.self_attn.q_proj.weight"].published.dtype == "float16"
    for name, change in changes.items():
        assert any(line.startswith(name) and line.endswith(change) for line in output.splitlines())
    assert output.splitlines()[-1] == (
        f"verify FAILED: {N_TENSORS + 1} tensors: {N_TENSORS - 4} identical, "
        "1 differ in content, 1 differ in shape, 1 differ in dtype, "
        "1 only in the published checkpoint, 1 only in the rebuild"
    )
    # many tensors: the table lists the failing ones only
    monkeypatch.setattr(reproduce_module, "MAX_TABLE_ROWS", 10)
    table = report.table().splitlines()
    assert len(table) == 1 + len(changes) + 2
    assert table[-2] == f"({N_TENSORS - 4} identical tensors not listed)"
    # on a GPU the rebuild can differ in the last bits from a CPU-made merge: say so
    assert "--device cpu" not in output
    monkeypatch.setattr(reproduce_module, "resolve_device", lambda _: torch.device("cuda"))
    _, output = run(published, verify=True)
    assert output.splitlines()[-1].startswith("note: rebuilt on cuda;")


# --------------------------------------------------------------------------------------------
# errors


def test_errors(tiny_family, tmp_path, offline):
    family = tiny_family()
    published = publish(recipe("ties", family, density=0.5), tmp_path / "pub")
    out = tmp_path / "out"

    assert "nothing to do" in error_of(published)
    out.mkdir()
    assert error_of(published, out=out) == f"{out}: already exists; give --out a new folder"
    out.rmdir()

    bare = shutil.copytree(published, tmp_path / "bare")
    (bare / RECIPE_FILE).unlink()
    (bare / "README.md").write_text("# a merge\n\n```yaml\nlicense: mit\n```\n")
    message = error_of(bare, verify=True)
    assert f"{bare}: no merge recipe found" in message
    assert all(f in message for f in (RECIPE_FILE, "mergekit_config.yml", "README.md"))

    (bare / RECIPE_FILE).write_text("merge_method: [\n")
    assert f"{bare}/{RECIPE_FILE}: malformed YAML" in error_of(bare, verify=True)

    unreachable = recipe("ties", family, density=0.5)
    unreachable["models"][1]["model"] = "nobody/does-not-exist"
    (bare / RECIPE_FILE).write_text(parse_recipe(unreachable).to_yaml())
    message = error_of(bare, out=out, verify=True)
    assert message.startswith(f"{bare}/{RECIPE_FILE}: nobody/does-not-exist: ")
    assert "HF_HUB_OFFLINE" in message
    assert not out.exists()

    pickled = shutil.copytree(published, tmp_path / "pickled")
    tensors: dict[str, torch.Tensor] = {}
    for shard in pickled.glob("*.safetensors"):
        tensors.update(load_file(shard))
        shard.unlink()
    (pickled / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save(tensors, pickled / "pytorch_model.bin")
    message = error_of(pickled, out=out, verify=True, allow_pickle=True)
    assert "only .bin weights" in message and "verification reads safetensors" in message
    assert not out.exists()  # refused before merging
    report, _ = run(pickled, out=out)  # without --verify it needs no published weights
    assert report is None and (out / "config.json").is_file()

    sharded = publish(recipe("linear", family), tmp_path / "sharded", shard="20KB")
    next(sharded.glob("*-00002-of-*.safetensors")).unlink()
    message = error_of(sharded, out=tmp_path / "out2", verify=True)
    assert message.startswith(f"{sharded}: shard model-00002-of-") and message.endswith("missing")
    assert not (tmp_path / "out2").exists()

    message = error_of("nobody/published-merge@v2", verify=True)
    assert message.startswith("nobody/published-merge@v2: ") and "HF_HUB_OFFLINE" in message


def test_cli_exit_codes(tiny_family, tmp_path):
    """`evomerge reproduce --verify` exits 0 on a match and 1 on a mismatch; `evomerge publish
    --dry-run` lists the upload and exits 0."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    published = publish(recipe("linear", tiny_family()), tmp_path / "pub")
    runner = CliRunner()
    ok = runner.invoke(app, ["reproduce", str(published), "--verify", "--device", "cpu"])
    assert ok.exit_code == 0 and "verify PASSED" in ok.output
    tampered = shutil.copytree(published, tmp_path / "tampered")
    tensors = load_file(tampered / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, tampered / "model.safetensors", metadata={"format": "pt"})
    bad = runner.invoke(app, ["reproduce", str(tampered), "--verify", "--device", "cpu"])
    assert bad.exit_code == 1 and "model.norm.weight" in bad.output
    dry = runner.invoke(
        app, ["publish", str(published), "--repo", "someone/x", "--dry-run", "--license", "mit"]
    )
    assert dry.exit_code == 0 and "model.safetensors" in dry.output and "license: mit" in dry.output
