"""The checks a model folder passes before it is published: it is what it looks like (files in
the folder, no links out, no pickles, no stray large files), its weights agree with its shard
index (`merge/weights.py`) and with the model its config.json describes, and it carries the
recipe that rebuilds it. A search output folder publishes its `model/` with its plots."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.merge.architecture import expected_tensors, meta_model
from evomerge.merge.errors import MergeError, first_line
from evomerge.merge.materialize import MERGEKIT_FILE, RECIPE_FILE, TOKENIZER_FILES
from evomerge.merge.recipe import Recipe, parse_recipe, parse_yaml, read_text
from evomerge.merge.weights import INDEX_FILE, SINGLE_FILE, WeightIndex, file_in_folder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_SIDE_FILE = 5 * 1000**2  # bytes; larger files must be weights or tokenizer files
PLOTS = {  # search plots (search/report.py) and their captions
    "fitness.png": "Fitness per generation",
    "best_parameters.png": "Best genome",
    "scores.png": "Reference scores",
    "pareto.png": "Pareto front",
}
SCORES_FILE = "scores.json"
README_FILE = "README.md"
SEED_HEADER = re.compile(r"#\s*made by evomerge with --seed (\d+)")
README_SEED = re.compile(r"evomerge merge \S+ \S+ --seed (\d+)")  # the line evomerge's card has
YAML_BLOCK = re.compile(r"^```ya?ml[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INPUT_KEYS = {"models", "slices", "modules"}


def locate(folder: Path) -> tuple[Path, Path | None]:
    """(the model folder, the search output folder or None)."""
    if not folder.is_dir():
        raise MergeError(
            f"{folder}: no such folder; give a merge (evomerge merge) or a search "
            "output (evomerge search)"
        )
    if (folder / "config.json").is_file():
        return folder, None
    if (folder / "model" / "config.json").is_file():
        return folder / "model", folder
    raise MergeError(
        f"{folder}: no config.json, nor model/config.json; give the folder written "
        "by evomerge merge, or a search output folder holding model/"
    )


def model_files(model_dir: Path) -> list[Path]:
    """Every file of the model folder, hidden files and folders left out; each one checked to
    be what it seems (`checked_file`)."""
    return [
        checked_file(model_dir, path)
        for path in sorted(model_dir.rglob("*"))
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(model_dir).parts)
    ]


def checked_file(folder: Path, path: Path) -> Path:
    """A file to upload: its name holds no control character (a newline would forge a line of
    the listing) and it is no link out of `folder` (it could be a token file)."""
    name = path.relative_to(folder).as_posix()
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise MergeError(
            f"{folder}: a file name holds a control character ({name!r}); rename or remove it "
            "before publishing"
        )
    return file_in_folder(folder, name, str(folder))


def check_no_pickles(files: list[Path], model_dir: Path) -> None:
    for path in files:
        if path.name.lower().endswith(PICKLE_SUFFIXES):
            raise MergeError(
                f"{path}: pickled files can run code when loaded and are not published; "
                f"remove it from {model_dir} (the weights must be safetensors)"
            )


def check_no_large_files(
    files: list[Path], model_dir: Path, shapes: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    shards = {file for file, _ in shapes.values()}
    for path in files:
        name = path.relative_to(model_dir).as_posix()
        allowed = name in shards or name == INDEX_FILE or name in TOKENIZER_FILES
        size = path.stat().st_size
        if not allowed and size > MAX_SIDE_FILE:
            raise MergeError(
                f"{path}: {size / 1e6:.1f} MB and not a weight shard or tokenizer file; "
                f"move it out of {model_dir} before publishing"
            )


def checked_weights(model_dir: Path, files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors file, shape), after checking the index against the files
    (`WeightIndex`) and that no weight file lies outside what the Hub expects."""
    on_disk = [p.relative_to(model_dir).as_posix() for p in files if p.suffix == ".safetensors"]
    if not (model_dir / INDEX_FILE).is_file() and on_disk != [SINGLE_FILE]:
        found = ", ".join(on_disk) if on_disk else "no .safetensors file"
        raise MergeError(
            f"{model_dir}: found {found}; expected {SINGLE_FILE}, or shards with {INDEX_FILE}"
        )
    weights = WeightIndex.read(model_dir)
    for file in weights.unindexed:
        raise MergeError(
            f"{file}: a safetensors file {INDEX_FILE} does not "
            "name; delete it or add its tensors to the index"
        )
    return weights.shapes()


def check_against_config(model_dir: Path, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The model config.json describes, built on the meta device, has exactly these tensors."""
    expected, may_be_absent, ignored = model_expected_tensors(model_dir)
    for name, (shard, shape) in sorted(shapes.items()):
        if name not in expected:
            if any(pattern.search(name) for pattern in ignored):
                continue
            raise MergeError(
                f"{model_dir / shard}: tensor {name} is not a weight of the model "
                "config.json describes; the weights and config.json do not match"
            )
        if expected[name] != shape:
            raise MergeError(
                f"{model_dir / shard}: tensor {name} has shape {list(shape)} but "
                f"config.json's model needs {list(expected[name])}; the weights and "
                "config.json do not match"
            )
    missing = sorted(set(expected) - set(shapes) - may_be_absent)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MergeError(
            f"{model_dir}: tensor {missing[0]}{more} of the model config.json "
            "describes is in no safetensors file; rebuild the merge"
        )


def model_expected_tensors(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], set[str], list]:
    """`architecture.expected_tensors` of the model the folder's config.json describes."""
    from transformers import AutoConfig

    config_file = model_dir / "config.json"
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many kinds for a bad config
        problem = first_line(exc)
        raise MergeError(f"{config_file}: transformers cannot load it ({problem})") from None
    return expected_tensors(meta_model(config, str(config_file)))


@dataclass(frozen=True)
class FoundRecipe:
    recipe: Recipe
    origin: str  # the file (and README block) it came from, for messages
    seed: int | None  # the seed recorded beside it, if any
    file: Path  # the file it was read from
    text: str  # that file's text



def find_recipe(folder: Path, name: str | None = None, *, card: bool = True) -> FoundRecipe:
    """The recipe of a merge folder (`name` is how messages call the folder):
    evomerge_recipe.yaml (with its seed), else mergekit_config.yml, else (with `card`) the model
    card's first YAML block that is a recipe."""
    name = name or str(folder)
    for file in (RECIPE_FILE, MERGEKIT_FILE):
        if (folder / file).is_file():
            text = read_text(folder / file, "recipe")
            seed = SEED_HEADER.match(text) if file == RECIPE_FILE else None
            origin = f"{name}/{file}"
            data = parse_yaml(text, origin)
            if not isinstance(data, dict):
                raise MergeError(f"{origin}: expected a YAML mapping with merge_method and models")
            recipe = _parse(data, origin)
            return FoundRecipe(recipe, origin, int(seed[1]) if seed else None, folder / file, text)
    if card and (folder / README_FILE).is_file():
        text = read_text(folder / README_FILE, "model card")
        for number, block in enumerate(YAML_BLOCK.finditer(text), 1):
            data = None
            with contextlib.suppress(MergeError):  # not YAML: not the recipe
                data = parse_yaml(block[1], README_FILE)
            if isinstance(data, dict) and "merge_method" in data and data.keys() & INPUT_KEYS:
                origin = f"{name}/{README_FILE} (yaml block {number})"
                seed = README_SEED.search(text)
                recipe, number_seed = _parse(data, origin), int(seed[1]) if seed else None
                return FoundRecipe(recipe, origin, number_seed, folder / README_FILE, block[1])
    looked = f" and a yaml block with merge_method in {README_FILE}" if card else ""
    raise MergeError(
        f"{name}: no merge recipe found (looked for {RECIPE_FILE}, {MERGEKIT_FILE}{looked})"
    )


def _parse(data: dict[str, Any], origin: str) -> Recipe:
    """Parse a recipe (mergekit's Python API saves one as `modules: {default: ...}`, which
    `parse_recipe` unwraps)."""
    return parse_recipe(data, origin)


def search_files(search_dir: Path) -> tuple[dict[str, Path], list | None]:
    """The search output's files published beside the card, and its reference scores."""
    from evomerge.search.records import ModelScores

    extras = {
        name: checked_file(search_dir, search_dir / name)
        for name in PLOTS
        if (search_dir / name).is_file()
    }
    scores_file = search_dir / SCORES_FILE
    if not scores_file.is_file():
        return extras, None
    checked_file(search_dir, scores_file)
    try:
        data = json.loads(read_text(scores_file, "the search's scores"))
        references = [ModelScores.from_dict(entry) for entry in data]
    except (ValueError, KeyError, TypeError, IndexError):
        raise MergeError(
            f"{scores_file}: not a list of model scores as evomerge search writes "
            "them; remove it or rerun the search"
        ) from None
    extras[SCORES_FILE] = scores_file
    return extras, references
