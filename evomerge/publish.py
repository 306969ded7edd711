"""`evomerge publish`: check a merged model folder and upload it to the Hugging Face Hub with a
completed model card.

    plan = publish(Path("runs/demo"), "user/name", dry_run=True)

The folder is a merge written by `evomerge merge`, or a search output (`evomerge search`), whose
`model/` is published with the search's plots and `scores.json` beside the card. Everything is
checked before anything leaves the machine: config.json against the weights' names and shapes,
safetensors only, the shard index against the files, no stray large files. The card and links
to the files are built in a temporary staging folder, which is what gets uploaded; the user's
folder is never modified. The token comes from huggingface_hub's usual sources and is never read
here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from evomerge.merge.architecture import expected_tensors, meta_model
from evomerge.merge.errors import MergeError, first_line
from evomerge.merge.materialize import MERGEKIT_FILE, RECIPE_FILE, TOKENIZER_FILES
from evomerge.merge.recipe import Recipe, read_text
from evomerge.merge.refs import ModelRef
from evomerge.merge.weights import INDEX_FILE, SINGLE_FILE, WeightIndex, file_in_folder

Echo = Callable[[str], None]
CARD_FILE = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_SIDE_FILE = 5 * 1000**2  # bytes; larger files must be weights or tokenizer files
LARGE_UPLOAD = 5 * 1000**3  # bytes; above this, upload_large_folder when the client has it
PLOTS = {  # search plots (search/report.py) and their captions
    "fitness.png": "Fitness per generation",
    "best_parameters.png": "Best genome",
    "scores.png": "Reference scores",
    "pareto.png": "Pareto front",
}
SCORES_FILE = "scores.json"
TAGS = ["merge", "evomerge", "mergekit"]
LICENSE_FIELDS = ("license", "license_name", "license_link")


@dataclass
class PublishPlan:
    repo: str
    files: list[tuple[str, int]]  # (path in the repository, bytes), sorted by path
    card: str  # the README.md uploaded
    folder: Path  # the staging folder uploaded; removed when publish() returns
    model_dir: Path  # the checked model folder whose files are uploaded
    warnings: list[str] = field(default_factory=list)
    url: str | None = None  # the repository's URL once uploaded; None for a dry run

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def publish(
    folder: Path,
    repo: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    license: str | None = None,
    echo: Echo = print,
) -> PublishPlan:
    """Check `folder` (a merge, or a search output holding `model/`) and upload it to the Hub
    repository `repo` with a completed model card; with `dry_run`, print what would be uploaded
    and upload nothing."""
    check_repo_id(repo)
    model_dir, search_dir = locate(Path(folder))
    files = model_files(model_dir)
    check_no_pickles(files, model_dir)
    shapes = checked_weights(model_dir, files)
    check_no_large_files(files, model_dir, shapes)
    check_against_config(model_dir, shapes)
    recipe_file, recipe_text = read_recipe(model_dir)
    recipe = Recipe.from_yaml(recipe_text, origin=str(recipe_file))
    warnings: list[str] = []
    license_fields = resolve_license(recipe.referenced_models(), license, warnings)
    local = [source for source in recipe.referenced_models() if not _hub_id(source)]
    if local:
        warnings.append(
            f"sources not on the Hub: {', '.join(local)}; the card lists them, and "
            f"`evomerge reproduce {repo}` works only where they exist at those paths"
        )
    extras, references = search_files(search_dir) if search_dir else ({}, None)
    uploads = {path.relative_to(model_dir).as_posix(): path for path in files}
    uploads.pop(CARD_FILE, None)  # replaced by the completed card
    uploads.update(extras)
    existing = _card_metadata(model_dir / CARD_FILE) if (model_dir / CARD_FILE).is_file() else {}
    card = model_card(
        repo,
        recipe,
        recipe_file.name,
        recipe_text,
        card_data(recipe.referenced_models(), license_fields, existing),
        references,
        [name for name in PLOTS if name in extras],
    )
    for warning in warnings:
        echo(f"warning: {warning}")
    staging = Path(tempfile.mkdtemp(prefix="evomerge-publish-"))
    try:
        staged = stage(staging, uploads, card)
        plan = PublishPlan(repo, staged, card, staging, model_dir, warnings)
        if dry_run:
            echo(describe(plan, private))
        else:
            plan.url = upload(plan, private, echo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plan


# --- the folder --------------------------------------------------------------------------------


def check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        valid = repo.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise MergeError(f"--repo {repo!r}: expected a Hub model id of the form user/name")


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


def read_recipe(model_dir: Path) -> tuple[Path, str]:
    for name in (RECIPE_FILE, MERGEKIT_FILE):
        if (model_dir / name).is_file():
            return model_dir / name, read_text(model_dir / name, "recipe")
    raise MergeError(
        f"{model_dir}: no {RECIPE_FILE} (nor {MERGEKIT_FILE}); publish needs the "
        "recipe so that `evomerge reproduce` can rebuild the merge"
    )


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


# --- licenses and the card ---------------------------------------------------------------------


def resolve_license(sources: list[str], chosen: str | None, warnings: list[str]) -> dict[str, str]:
    """The card's license fields: `chosen` if given, else the sources' common license."""
    if chosen:
        return {"license": chosen}
    known: dict[str, dict[str, str]] = {}
    for source in sources:
        data = source_card_metadata(source, warnings)
        if data is None:
            continue
        if data.get("license"):
            known[source] = {k: str(data[k]) for k in LICENSE_FIELDS if data.get(k)}
        else:
            warnings.append(f"{source}: its model card names no license")
    labels = {source: _license_label(fields) for source, fields in known.items()}
    if len(set(labels.values())) > 1:
        listed = ", ".join(f"{source}: {label}" for source, label in labels.items())
        raise MergeError(
            f"the sources' licenses differ ({listed}); choose the merge's license with --license ID"
        )
    if not known:
        warnings.append("no source's license is known: the card names none; pass --license ID")
        return {}
    return next(iter(known.values()))


def _license_label(fields: dict[str, str]) -> str:
    name = fields.get("license_name")
    return f"other ({name})" if fields["license"] == "other" and name else fields["license"]


def source_card_metadata(source: str, warnings: list[str]) -> dict[str, Any] | None:
    """A source's model card metadata (local README.md or the Hub); None with a warning when it
    cannot be read."""
    ref = ModelRef.parse(source)
    if ref.is_local:
        readme = Path(ref.path) / CARD_FILE
        if not readme.is_file():
            warnings.append(f"{source}: no {CARD_FILE}, so its license is unknown")
            return None
        return _card_metadata(readme)
    if ref.hub_id is None:
        warnings.append(f"{source}: neither a local folder nor a Hub id; its license is unknown")
        return None
    try:
        return ModelCard.load(ref.hub_id, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # offline, gone, gated, rate-limited: the license is just unknown
        warnings.append(
            f"{source}: cannot read its model card from the Hub "
            f"({type(exc).__name__}); its license is unknown"
        )
        return None


def _card_metadata(readme: Path) -> dict[str, Any]:
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # a hand-edited card with broken front matter
        raise MergeError(f"{readme}: cannot read its front matter ({first_line(exc)})") from None


def card_data(
    sources: list[str], license_fields: dict[str, str], existing: dict[str, Any] | None = None
) -> ModelCardData:
    """Card metadata: `existing` (the folder's card) updated with the sources' Hub ids as
    base_model, evomerge's tags, transformers and the license fields."""
    data = {k: v for k, v in (existing or {}).items() if k not in LICENSE_FIELDS}
    hub_ids = list(dict.fromkeys(i for i in map(_hub_id, sources) if i))
    data.pop("base_model", None)
    data.pop("base_model_relation", None)
    if hub_ids:
        data["base_model"] = hub_ids
        data["base_model_relation"] = "merge"
    data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *TAGS]))
    data["library_name"] = "transformers"
    data.update(license_fields)
    return ModelCardData(**data)


def _hub_id(source: str) -> str | None:
    return ModelRef.parse(source).hub_id


def model_card(
    repo: str,
    recipe: Recipe,
    recipe_name: str,
    recipe_text: str,
    data: ModelCardData,
    references: list | None,
    plots: list[str],
) -> str:
    from evomerge.merge.methods import get_method

    try:
        method = get_method(recipe.merge_method)
    except MergeError as exc:
        raise MergeError(f"{recipe_name}: {exc}") from None
    reference = f" ([paper]({method.reference}))" if method.reference else ""
    lines = [
        f"# {repo.split('/')[1]}",
        "",
        "A merge of pre-trained language models made with "
        "[evomerge](https://github.com/evomerge/evomerge)"
        + (", found by evolutionary search." if references is not None or plots else "."),
        "",
        "## Method",
        "",
        f"**{method.name}**{reference}: {method.description}",
        "",
        "## Models merged",
        "",
        *(_source_line(source, recipe.base_model) for source in recipe.referenced_models()),
        "",
    ]
    local = [source for source in recipe.referenced_models() if not _hub_id(source)]
    if local:
        listed = ", ".join(f"`{source}`" for source in local)
        lines += [
            f"Not on the Hub (local folders where this was merged): {listed}; rebuilding "
            "the merge needs copies of them at those paths.",
            "",
        ]
    if references is not None or plots:
        lines += _search_section(references, plots)
    lines += [
        "## Recipe",
        "",
        f"This is `{recipe_name}` in this repository; `mergekit-yaml` accepts it as well.",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
        "## Reproduce",
        "",
        "Rebuild the weights from the recipe and compare them with this repository's, tensor by "
        "tensor:",
        "",
        "```sh",
        f"evomerge reproduce {repo} --verify",
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _source_line(source: str, base: str | None) -> str:
    hub_id = _hub_id(source)
    name = f"[{source}](https://huggingface.co/{hub_id})" if hub_id else f"`{source}`"
    return f"- {name}" + (" (base)" if source == base else "")


def _search_section(references: list | None, plots: list[str]) -> list[str]:
    from evomerge.search.report import results_section

    lines = ["## Search", ""]
    if references:
        lines += [
            "Scores of the sources, the uniform merge and the best merge (this model) on "
            "the tasks searched on (fitness) and on held-out tasks, value ± stderr:",
            "",
        ]
        lines += results_section(references)[2:]  # without its "## Results" heading
    lines += [line for name in plots for line in (f"![{PLOTS[name]}]({name})", "")]
    return lines


# --- staging and upload ------------------------------------------------------------------------


def stage(staging: Path, uploads: dict[str, Path], card: str) -> list[tuple[str, int]]:
    """Links to the uploaded files and the card in `staging`; (path in repo, size) of each."""
    for name, source in uploads.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(source.resolve())
        except OSError:  # no symlinks here: copy
            shutil.copy2(source, target)
    (staging / CARD_FILE).write_text(card, encoding="utf-8")
    names = sorted([*uploads, CARD_FILE])
    return [(name, (staging / name).stat().st_size) for name in names]


def describe(plan: PublishPlan, private: bool) -> str:
    width = max(len(name) for name, _ in plan.files)
    lines = [
        f"dry run: would upload {len(plan.files)} files ({_size(plan.total_bytes)}) to "
        f"{_repo_url(plan.repo)}" + (" (private)" if private else ""),
        *(f"  {name.ljust(width)}  {size:>14,d} B" for name, size in plan.files),
        f"--- {CARD_FILE} ---",
        plan.card.rstrip(),
        f"--- end of {CARD_FILE}; nothing was uploaded ---",
    ]
    return "\n".join(lines)


def upload(plan: PublishPlan, private: bool, echo: Echo) -> str:
    from huggingface_hub import HfApi

    api = HfApi()  # the token: HF_TOKEN or the cached login, as huggingface_hub finds it
    echo(f"uploading {len(plan.files)} files ({_size(plan.total_bytes)}) to {plan.repo}")
    try:
        url = api.create_repo(plan.repo, private=private, repo_type="model", exist_ok=True)
        large = getattr(api, "upload_large_folder", None)
        if plan.total_bytes > LARGE_UPLOAD and large is not None:
            large(repo_id=plan.repo, folder_path=plan.folder, repo_type="model", private=private)
        else:
            api.upload_folder(
                repo_id=plan.repo,
                folder_path=plan.folder,
                repo_type="model",
                commit_message="Upload a merge made with evomerge",
            )
    except Exception as exc:  # HTTP, network and authentication errors
        raise MergeError(
            f"{plan.repo}: upload failed ({type(exc).__name__}: {first_line(exc)}); "
            "log in with `hf auth login` or set HF_TOKEN to a token that may write "
            "to this repository"
        ) from None
    url = str(url or _repo_url(plan.repo))
    echo(f"published {url}")
    return url


def _repo_url(repo: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo}"


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    power = min(3, (len(str(n)) - 1) // 3)
    return f"{n / 1000**power:.1f} {('kB', 'MB', 'GB')[power - 1]}"

