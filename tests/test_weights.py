"""The one weight-folder reader (`merge/weights.py`): corrupted headers and hostile shard indexes
are one-line errors before any tensor is read, through `evomerge merge` as through the API;
Hugging Face cache snapshots (links into the repo's blobs) still read."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml
from families import build_tiny_family, reshard

from evomerge import cli
from evomerge.merge.errors import MergeError
from evomerge.merge.weights import INDEX_FILE, SINGLE_FILE, WeightIndex


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("family"), arch="llama", seed=1)


@pytest.fixture
def model(family, tmp_path) -> Path:
    """A copy of the base, ours to break."""
    folder = tmp_path / "model"
    shutil.copytree(family.base, folder)
    return folder


@pytest.fixture
def sharded(family, tmp_path) -> Path:
    folder = tmp_path / "sharded"
    reshard(family.base, folder, "40KB")
    assert (folder / INDEX_FILE).is_file()
    return folder


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADERS = {
    "overlapping offsets": (
        {"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12,
        None,
    ),
    "a gap between tensors": (
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        b"\0" * 12,
        None,
    ),
    "truncated data": (
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        b"\0" * 8,
        None,
    ),
    "shape and offsets disagree": (
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        b"\0" * 8,
        None,
    ),
    "no dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    "a JSON list": ([1, 2], b"", None),
    "a length of 1 TiB": ({}, b"", 2**40),
    "a length of 2^64-1": ({}, b"", 2**64 - 1),
    "bytes after the last tensor": ({"a": F32_2}, b"\0" * 12, None),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_a_broken_header_is_one_line_naming_the_file(model, case):
    header, data, length = HEADERS[case]
    write_raw(model / SINGLE_FILE, header, data, length)
    with pytest.raises(MergeError) as err:
        WeightIndex.read(model, "base")
    message = str(err.value)
    assert "\n" not in message and message.startswith("base: model.safetensors is not a valid")


def test_a_file_shorter_than_its_length_field_is_refused(model):
    (model / SINGLE_FILE).write_bytes(b"\x01\x00")
    with pytest.raises(MergeError, match="not a valid safetensors file"):
        WeightIndex.read(model)


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def _write_index(folder: Path, data: object) -> None:
    (folder / INDEX_FILE).write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize(
    "broken",
    ["{not json", "[]", json.dumps({"metadata": {}}), json.dumps({"weight_map": [1]}),
     json.dumps({"weight_map": {"a": 1}})],
    ids=["not JSON", "a list", "no weight_map", "weight_map a list", "a number for a file"],
)  # fmt: skip
def test_a_broken_index_is_one_line(sharded, broken):
    _write_index(sharded, broken)
    with pytest.raises(MergeError, match="is not a shard index") as err:
        WeightIndex.read(sharded, "src")
    assert "\n" not in str(err.value) and str(err.value).startswith("src: ")


@pytest.mark.parametrize(
    "target", ["../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"]
)
def test_an_index_naming_a_file_outside_the_folder_is_refused(sharded, target):
    index = _index(sharded)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = target
    _write_index(sharded, index)
    with pytest.raises(MergeError, match="outside"):
        WeightIndex.read(sharded)


def test_a_shard_linking_to_another_model_folder_is_refused(sharded, family, tmp_path):
    """The index names a file in the folder, but the file is a link to another model's shard:
    merging would take another model's tensors without a word."""
    other = tmp_path / "other"
    reshard(family.experts[0], other, "40KB")
    shard = sorted(sharded.glob("*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(other / shard.name)
    with pytest.raises(MergeError, match=r"is a link to .* outside"):
        WeightIndex.read(sharded)


def test_a_shard_holding_tensors_the_index_maps_elsewhere_is_refused(sharded):
    index = _index(sharded)
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(n for n, f in index["weight_map"].items() if f == first)
    index["weight_map"][name] = second
    _write_index(sharded, index)
    with pytest.raises(MergeError, match=f"{first} holds tensor {name} but"):
        WeightIndex.read(sharded)


def test_a_hugging_face_cache_snapshot_reads_through_its_blob_links(family, tmp_path):
    repo = tmp_path / "hub" / "models--org--base"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in family.base.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    direct = WeightIndex.read(family.base).shapes()
    assert WeightIndex.read(snapshot).shapes() == direct and direct


def test_merge_refuses_a_traversing_index_before_writing(
    sharded, family, tmp_path, monkeypatch, capsys
):
    index = _index(sharded)
    index["weight_map"][next(iter(index["weight_map"]))] = "../../etc/passwd"
    _write_index(sharded, index)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(sharded), "parameters": {"weight": 0.5}},
                    {"model": str(family.experts[0]), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["evomerge", "merge", str(recipe), str(out)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "outside" in errors[0] and str(sharded) in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))
