"""Broken and hostile inputs through the CLI, as a careless user, a corrupted download or an
attacker would give them: each is exit 2 with one line naming the file or field and the fix, no
traceback, and nothing written. (Header and shard-index cases: test_weights.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from families import build_tiny_family
from helpers import stalled_cli
from safetensors.torch import load_file, save_file

from evomerge import cli


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_tiny_family(tmp_path_factory.mktemp("pristine"), seed=2).base.parent


@pytest.fixture
def fam(pristine, tmp_path) -> Path:
    """A fresh copy of the family (base, expert_1, expert_2), ours to break."""
    return Path(shutil.copytree(pristine, tmp_path / "fam"))


def run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["evomerge", *argv])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    return errors[0]


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def merge_recipe(fam: Path, path: Path, method: str = "task_arithmetic", **params) -> Path:
    models = [
        {"model": str(fam / name), "parameters": {"weight": 0.5, **params}}
        for name in ("expert_1", "expert_2")
    ]
    path.write_text(
        yaml.safe_dump({"merge_method": method, "base_model": str(fam / "base"), "models": models})
    )
    return path


def set_tensor(folder: Path, name: str, value: float) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# --- merge: each case breaks the family or the recipe, then runs `evomerge merge R OUT` ---------


def _config_not_json(fam, r):
    (fam / "expert_1" / "config.json").write_text("{oops")
    return merge_recipe(fam, r), "config.json: the model config is not valid JSON"


def _config_a_list(fam, r):
    (fam / "expert_1" / "config.json").write_text("[1, 2]")
    return merge_recipe(fam, r), "must be a JSON object, not a list"


def _layers_a_word(fam, r):
    edit_json(fam / "base" / "config.json", lambda d: d.update(num_hidden_layers="five"))
    return merge_recipe(fam, r), "num_hidden_layers is 'five'"


def _config_missing(fam, r):
    (fam / "expert_2" / "config.json").unlink()
    return merge_recipe(fam, r), "no config.json"


def _hidden_size_off(fam, r):
    edit_json(fam / "base" / "config.json", lambda d: d.update(hidden_size=64))
    return merge_recipe(fam, r), "the config does not match the weights"


def _vocab_size_off(fam, r):
    edit_json(fam / "base" / "config.json", lambda d: d.update(vocab_size=7))
    return merge_recipe(fam, r), "the config does not match the weights"


def _tokenizer_config_broken(fam, r):
    (fam / "base" / "tokenizer_config.json").write_text("{bad")
    path = merge_recipe(fam, r)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "chat_template": "auto"}))
    return path, "tokenizer_config.json: the tokenizer config is not valid JSON"


def _recipe_not_utf8(fam, r):
    path = merge_recipe(fam, r)
    path.write_bytes(path.read_bytes() + b"\n# \xff\xfe\n")
    return path, "is not UTF-8 text"


def _recipe_not_yaml(fam, r):
    r.write_text("merge_method: [unclosed\n")
    return r, "malformed YAML"


def _recipe_a_list(fam, r):
    r.write_text("- merge_method: ties\n")
    return r, "expected a YAML mapping"


def _della_epsilon(fam, r):
    return merge_recipe(fam, r, "della", density=0.05, epsilon=0.1), "density ± epsilon"


def _dare_negative_density(fam, r):
    return merge_recipe(fam, r, "dare_ties", density=-0.5), "density must lie in [0, 1]"


def _nan_in_a_source(fam, r):
    set_tensor(fam / "expert_1", "model.norm.weight", float("nan"))
    return merge_recipe(fam, r), "model.norm.weight: the merge gives non-finite values"


def _inf_weight(fam, r):
    return merge_recipe(fam, r, weight=float("inf")), "non-finite values"


def _unknown_method(fam, r):
    return merge_recipe(fam, r, "tiess"), "tiess"


def _missing_model(fam, r):
    path = merge_recipe(fam, r)
    path.write_text(path.read_text().replace(str(fam / "expert_2"), str(fam / "gone")))
    return path, "no such directory"


def _model_is_a_file(fam, r):
    (fam / "notes.txt").write_text("x")
    path = merge_recipe(fam, r)
    path.write_text(path.read_text().replace(str(fam / "expert_2"), str(fam / "notes.txt")))
    return path, "not a directory"


def _only_pickles(fam, r):
    folder = fam / "expert_2"
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return merge_recipe(fam, r), "pass --allow-pickle if you trust it"


def _no_weights(fam, r):
    (fam / "expert_2" / "model.safetensors").unlink()
    return merge_recipe(fam, r), "no *.safetensors weights"


def _truncated_weights(fam, r):
    file = fam / "expert_1" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    return merge_recipe(fam, r), "not a valid safetensors file"


def _shape_mismatch(fam, r):
    tensors = load_file(fam / "expert_1" / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(5)
    save_file(tensors, fam / "expert_1" / "model.safetensors", metadata={"format": "pt"})
    return merge_recipe(fam, r), "model.norm.weight"


MERGE_CASES = {
    case.__name__.removeprefix("_"): case
    for case in (
        _config_not_json, _config_a_list, _layers_a_word, _config_missing, _hidden_size_off,
        _vocab_size_off, _tokenizer_config_broken, _recipe_not_utf8, _recipe_not_yaml,
        _recipe_a_list, _della_epsilon, _dare_negative_density, _nan_in_a_source, _inf_weight,
        _unknown_method, _missing_model, _model_is_a_file, _only_pickles,
        _no_weights, _truncated_weights, _shape_mismatch,
    )
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_refuses(case, fam, tmp_path, monkeypatch, capsys):
    recipe, expected = MERGE_CASES[case](fam, tmp_path / "r.yaml")
    before = {p: p.read_bytes() for p in fam.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    code, err = run_cli(["merge", str(recipe), str(out), "--device", "cpu"], monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and expected in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert {p: p.read_bytes() for p in fam.rglob("*") if p.is_file()} == before  # inputs intact


@pytest.mark.parametrize("where", ["a file's child", "the recipe itself"])
def test_merge_refuses_an_output_path_it_cannot_create(where, fam, tmp_path, monkeypatch, capsys):
    recipe = merge_recipe(fam, tmp_path / "r.yaml")
    out = tmp_path / "r.yaml" / "out" if where == "a file's child" else recipe
    code, err = run_cli(["merge", str(recipe), str(out)], monkeypatch, capsys)
    assert code == 2 and ("is a file, not a folder" in one_error_line(err) or "exists" in err)
    assert recipe.is_file()


def slow_merge_process(recipe: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`evomerge merge` stalled at its first tensor until a file `release` appears beside
    `marker` (helpers.stalled_cli)."""
    marker, release = out.parent / "merging", out.parent / "release"
    argv = ["merge", str(recipe), str(out), "--device", "cpu", *extra]
    return stalled_cli(argv, marker, release), marker


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_merge_says_nothing_was_written(signum, fam, tmp_path):
    recipe = merge_recipe(fam, tmp_path / "r.yaml", "ties", density=0.5)
    out = tmp_path / "out"
    process, _marker = slow_merge_process(recipe, out)
    assert list(tmp_path.glob(".out.partial-*"))
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"interrupted; nothing was written to {out}"
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_second_merge_into_the_same_folder_refuses_and_the_first_finishes(
    fam, tmp_path, monkeypatch, capsys
):
    recipe = merge_recipe(fam, tmp_path / "r.yaml", "ties", density=0.5)
    out = tmp_path / "out"
    first, marker = slow_merge_process(recipe, out)
    try:
        for extra in ([], ["--overwrite"]):
            code, err = run_cli(["merge", str(recipe), str(out), *extra], monkeypatch, capsys)
            line = one_error_line(err)
            assert code == 2 and f"another evomerge process (pid {first.pid})" in line, line
    finally:
        (marker.parent / "release").touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (errno.ENOSPC, "free space on that disk, or write elsewhere"),
        (errno.EMFILE, "raise the open-file limit (ulimit -n)"),
        (errno.EROFS, "a read-only file system: write elsewhere"),
        (errno.EPERM, "an immutable file or folder (lsattr)? write elsewhere"),
    ],
    ids=["ENOSPC", "EMFILE", "EROFS", "EPERM"],
)
def test_the_system_refusing_a_write_is_one_line_and_the_previous_output_stays(
    code, remedy, fam, tmp_path, monkeypatch, capsys
):
    import evomerge.merge.materialize as materialize

    recipe = merge_recipe(fam, tmp_path / "r.yaml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("kept")

    def refused(plan, staging, *args):
        raise OSError(code, os.strerror(code), str(staging / "config.json"))

    monkeypatch.setattr(materialize, "write_side_files", refused)
    done, err = run_cli(["merge", str(recipe), str(out), "--overwrite"], monkeypatch, capsys)
    line = one_error_line(err)  # the file named as the output's, not the staged copy's
    assert done == 2 and line == f"error: {out}/config.json: {os.strerror(code)}; {remedy}"
    assert (out / "previous").read_text() == "kept" and list(out.iterdir()) == [out / "previous"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_file_size_limit_is_one_line_with_nothing_left(fam, tmp_path):
    """A real limit (RLIMIT_FSIZE), not a simulated one: Python ignores SIGXFSZ, so the write
    fails with EFBIG, as it would on a file system's own cap."""
    import resource

    recipe = merge_recipe(fam, tmp_path / "r.yaml")
    out = tmp_path / "out"
    limit = (fam / "base" / "model.safetensors").stat().st_size // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-m", "evomerge", "merge", str(recipe), str(out), "--device", "cpu"],
        preexec_fn=small_files, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "File too large; a file-size limit" in line, line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# --- search and its dry run give the same errors ------------------------------------------------


def search_recipe(fam: Path, path: Path, **changes) -> Path:
    data = {
        "merge": {
            "merge_method": "dare_ties",
            "base_model": str(fam / "base"),
            "models": [{"model": str(fam / "expert_1")}, {"model": str(fam / "expert_2")}],
            "dtype": "float32",
        },
        "space": {"parameters": {"weight": {"low": 0, "high": 1}}},
        "fitness": {
            "tasks": [
                {
                    "task": "demo_skill_a",
                    "metric": "exact_match",
                    "rows": "0:4",
                    "heldout": {"task": "demo_skill_a_heldout", "rows": "0:4"},
                }
            ]
        },
        "budget": {"evaluations": 2},
        "optimizer": {"name": "CMA", "population": 2},
        "device": "cpu",
    }
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


SEARCH_CASES = {
    "an unknown CMA option": (
        {"optimizer.options": {"popsise": 4}},
        "optimizer.options.popsise: not an option of Nevergrad's CMA (did you mean popsize?)",
    ),
    "an unknown Optuna option": (
        {"optimizer": {"backend": "optuna", "name": "TPESampler", "options": {"n_startup": 3}}},
        "optimizer.options.n_startup: not an option of TPESampler",
    ),
    "a missing local source": (
        {"merge.models": [{"model": "/nonexistent/expert"}]},
        "/nonexistent/expert: no such directory",
    ),
    "cuda without a GPU": ({"device": "cuda"}, "no CUDA device is available"),
    "a filter that matches no tensor": (
        {"space.filters": ["self_atn"]},
        "space.filters: 'self_atn' is in no tensor name",
    ),
    "inverted bounds": ({"space.parameters": {"weight": {"low": 1, "high": 0}}}, "weight"),
    "a zero budget": ({"budget": {"evaluations": 0}}, "budget"),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda case needs a machine without one")
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", sorted(SEARCH_CASES))
def test_search_and_its_dry_run_refuse_alike(case, dry_run, fam, tmp_path, monkeypatch, capsys):
    changes, expected = SEARCH_CASES[case]
    recipe = search_recipe(fam, tmp_path / "s.yaml", **changes)
    out = tmp_path / "out"
    argv = ["search", str(recipe), "--out", str(out), *(["--dry-run"] if dry_run else [])]
    code, err = run_cli(argv, monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and expected in line, line
    assert not out.exists()


def test_search_refuses_an_output_under_a_file(fam, tmp_path, monkeypatch, capsys):
    recipe = search_recipe(fam, tmp_path / "s.yaml")
    code, err = run_cli(["search", str(recipe), "--out", str(recipe / "out")], monkeypatch, capsys)
    assert code == 2 and "is a file, not a folder" in one_error_line(err)


# --- eval ---------------------------------------------------------------------------------------


def _eval_truncated(fam, tmp_path):
    file = fam / "base" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    return [str(fam / "base")], "not a valid safetensors file"


def _eval_traversing_index(fam, tmp_path):
    index = {"weight_map": {"model.norm.weight": "../expert_1/model.safetensors"}}
    (fam / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    return [str(fam / "base")], "outside"


def _eval_output_under_a_file(fam, tmp_path):
    (tmp_path / "afile").write_text("x")
    return [str(fam / "base"), "--output", str(tmp_path / "afile" / "x.json")], "not a folder"


def _eval_no_config(fam, tmp_path):
    (fam / "base" / "config.json").unlink()
    return [str(fam / "base")], "no config.json"


EVAL_CASES = {
    "truncated weights": _eval_truncated,
    "an index naming another folder's shard": _eval_traversing_index,
    "an output under a file": _eval_output_under_a_file,
    "no config.json": _eval_no_config,
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_refuses(case, fam, tmp_path, monkeypatch, capsys):
    args, expected = EVAL_CASES[case](fam, tmp_path)
    argv = ["eval", *args, "--tasks", "demo_skill_a", "--limit", "2", "--device", "cpu"]
    if "--output" not in args:
        argv += ["--output", str(tmp_path / "result.json")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(argv, monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "result.json").exists()


def test_an_output_folder_without_write_permission_is_refused_first(fam, tmp_path, monkeypatch):
    """As root every folder is writable, so the permission answer is forced here: the check
    runs before any work and names the folder."""
    from evomerge.merge.errors import MergeError
    from evomerge.merge.materialize import run_merge
    from evomerge.merge.recipe import load_recipe

    recipe = merge_recipe(fam, tmp_path / "r.yaml")
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(MergeError, match=r"cannot write in .*locked"):
        run_merge(load_recipe(recipe), locked / "out", device="cpu", progress=False)
    assert list(locked.iterdir()) == []
