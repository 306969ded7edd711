"""Running a plan to a checkpoint folder: streamed tensors, patched config, tokenizer, card.

The folder is built as a hidden temporary sibling and renamed into place at the end, so an
interrupted merge never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from evomerge.merge.architecture import config_shape_mismatch
from evomerge.merge.card import model_card
from evomerge.merge.chat_template import resolve_chat_template
from evomerge.merge.compute import compute_task, input_tensors, resolve_device
from evomerge.merge.errors import MergeError
from evomerge.merge.layers import layered_config
from evomerge.merge.plan import MergePlan, build_plan
from evomerge.merge.recipe import Recipe
from evomerge.merge.staging import check_can_create, staged_dir
from evomerge.merge.writer import Entry, ShardedWriter, parse_size

TOKENIZER_FILES = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
RECIPE_FILE = "evomerge_recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"  # what mergekit-yaml writes beside its merges


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    check_can_create(out_dir)
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir}: already exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"{out_dir}: exists and is not a directory")


def check_not_an_input(out_dir: Path, inputs: list[Path]) -> None:
    """The output folder is never an input model's folder, above one, or inside one: replacing
    it (`--overwrite`) must not remove or change an input of the same merge."""
    out = out_dir.resolve()
    for source in inputs:
        real = Path(source).resolve()
        if out == real or out in real.parents or real in out.parents:
            where = "is" if out == real else "holds" if out in real.parents else "lies inside"
            raise MergeError(
                f"{out_dir}: {where} the input model folder {source}; write the merge to a "
                "folder of its own"
            )


def run_merge(
    recipe: Recipe,
    out_dir: Path,
    *,
    device: str = "auto",
    out_shard_size: str | int = "5GB",
    seed: int = 0,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge `recipe` into `out_dir`; every input problem is raised before any tensor is read."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    shard_bytes = parse_size(out_shard_size)
    torch_device = resolve_device(device)
    plan = build_plan(recipe, allow_pickle=allow_pickle)
    check_not_an_input(out_dir, [ckpt.path for ckpt in plan.checkpoints.values()])
    mismatch = config_shape_mismatch(output_config(plan), {t.out_name: t.shape for t in plan.tasks})
    if mismatch is not None:
        name, described, made = mismatch
        raise MergeError(
            f"{plan.checkpoints[plan.config_model].path / 'config.json'}: describes {name} as "
            f"{list(described)} but the merge makes {list(made)} from the sources' weights; "
            "the config does not match the weights (hidden_size, vocab_size, head counts?)"
        )
    chat_template = None
    if recipe.chat_template:
        dirs = [ckpt.path for ckpt in plan.checkpoints.values()]
        chat_template = resolve_chat_template(recipe.chat_template, dirs)
    try:
        with staged_dir(out_dir, overwrite=overwrite) as staging:
            write_weights(plan, staging, torch_device, seed, shard_bytes, progress)
            write_side_files(plan, staging, seed, out_dir.name, chat_template)
    finally:
        for ckpt in plan.checkpoints.values():
            ckpt.close()
    return out_dir


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """A merge never writes NaN or Inf: they come from a broken source or recipe (weights that
    are NaN, or linear weights summing to zero) and make a checkpoint that generates garbage."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MergeError(
            f"{name}: the merge gives non-finite values (NaN or Inf); check the sources' weights "
            "and the recipe's parameters (linear weights must not sum to zero)"
        )


def write_weights(
    plan: MergePlan,
    out_dir: Path,
    device: torch.device,
    seed: int,
    shard_bytes: int,
    progress: bool = True,
) -> None:
    entries = [Entry(t.out_name, t.shape, t.out_dtype) for t in plan.tasks]

    def read(model: str, name: str) -> torch.Tensor:
        return plan.checkpoints[model].read(name, device)

    bar = tqdm(
        total=plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress
    )
    with ShardedWriter(out_dir, entries, shard_bytes) as writer, bar:
        for done, task in enumerate(plan.tasks, 1):
            result = compute_task(plan, task, input_tensors(plan, task, read), seed, device)
            check_finite(task.out_name, result)
            writer.write(task.out_name, result)
            bar.update(task.nbytes)
            bar.set_postfix_str(f"{done}/{len(plan.tasks)} tensors", refresh=False)


def output_config(plan: MergePlan) -> dict:
    configs = {ref: ckpt.config for ref, ckpt in plan.checkpoints.items()}
    config = layered_config(configs[plan.config_model], plan.layer_sources, configs)
    text = config.get("text_config") or config
    if plan.vocabulary is not None:
        text["vocab_size"] = plan.vocabulary.size
    dtypes = {t.out_dtype for t in plan.tasks if t.out_dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).removeprefix("torch.")
        config["dtype"] = name
        config.pop("torch_dtype", None)
        if text is not config and "dtype" in text:
            text["dtype"] = name
    return config


def write_side_files(
    plan: MergePlan, out_dir: Path, seed: int, name: str, chat_template: str | None = None
) -> None:
    (out_dir / "config.json").write_text(json.dumps(output_config(plan), indent=2) + "\n")
    donor = plan.checkpoints[plan.config_model].path
    if plan.vocabulary is not None:
        plan.vocabulary.tokenizer.save_pretrained(out_dir)
    else:
        for file in TOKENIZER_FILES:
            if (donor / file).is_file():
                shutil.copy2(donor / file, out_dir / file)
    if (donor / "generation_config.json").is_file():
        shutil.copy2(donor / "generation_config.json", out_dir / "generation_config.json")
    if chat_template is not None:
        (out_dir / "chat_template.json").unlink(missing_ok=True)
        (out_dir / "chat_template.jinja").write_text(chat_template)
    recipe_yaml = plan.recipe.to_yaml(mark_local=True)
    header = f"# made by evomerge with --seed {seed}\n" if plan.method.stochastic else ""
    (out_dir / RECIPE_FILE).write_text(header + recipe_yaml)
    (out_dir / "README.md").write_text(model_card(plan, recipe_yaml, seed, name))

