"""`evomerge publish`: check a merged model folder and upload it to the Hugging Face Hub with a
completed model card.

    plan = publish(Path("runs/demo"), "user/name", dry_run=True)

The folder is a merge written by `evomerge merge`, or a search output (`evomerge search`), whose
`model/` is published with the search's plots and `scores.json` beside the card. Everything is
checked before anything leaves the machine (`folder_checks.py`: config.json against the weights'
names and shapes, safetensors only, the shard index against the files, no links out of the
folder, no stray large files); the card is `hub_card.py`'s. This module stages and uploads. The
card and links
to the files are built in a temporary staging folder, which is what gets uploaded; the user's
folder is never modified. The token comes from huggingface_hub's usual sources and is never read
here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.folder_checks import (
    PLOTS,
    check_against_config,
    check_no_large_files,
    check_no_pickles,
    checked_weights,
    find_recipe,
    locate,
    model_files,
    search_files,
)
from evomerge.hub_card import CARD_FILE, TAGS, card_metadata, model_card, resolve_license
from evomerge.merge.card import card_data, hub_id_of
from evomerge.merge.errors import MergeError, first_line

Echo = Callable[[str], None]
LARGE_UPLOAD = 5 * 1000**3  # bytes; above this, upload_large_folder when the client has it


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
    try:
        found = find_recipe(model_dir, card=False)  # the card is rewritten: not a source
    except MergeError as exc:
        raise MergeError(
            f"{exc}; publish needs the recipe so that `evomerge reproduce` can rebuild the merge"
        ) from None
    recipe, recipe_file, recipe_text = found.recipe, found.file, found.text
    warnings: list[str] = []
    license_fields = resolve_license(recipe.referenced_models(), license, warnings)
    local = [source for source in recipe.referenced_models() if not hub_id_of(source)]
    if local:
        warnings.append(
            f"sources not on the Hub: {', '.join(local)}; the card lists them, and "
            f"`evomerge reproduce {repo}` works only where they exist at those paths"
        )
    extras, references = search_files(search_dir) if search_dir else ({}, None)
    uploads = {path.relative_to(model_dir).as_posix(): path for path in files}
    uploads.pop(CARD_FILE, None)  # replaced by the completed card
    uploads.update(extras)
    existing = card_metadata(model_dir / CARD_FILE) if (model_dir / CARD_FILE).is_file() else {}
    card = model_card(
        repo,
        recipe,
        recipe_file.name,
        recipe_text,
        card_data(recipe.referenced_models(), license_fields, existing, TAGS),
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


# --- licenses and the card ---------------------------------------------------------------------


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

