"""Writes that readers never see half-made: a folder is built in a hidden sibling
(`.NAME.partial-XXXXXXXX`) and renamed into place when complete; a file is written beside its
target and replaced in one step. An interrupted write leaves nothing that looks complete."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge.merge.errors import MergeError


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out_dir` to build into; on success it replaces `out_dir`
    (a previous folder there is removed only once the new one is in place), on any error or
    interrupt it is deleted."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "partial")
    staging.mkdir()
    try:
        yield staging
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def move_into_place(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = _sibling(out_dir, "old")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a text file whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_can_create(path: Path, error: type[MergeError] = MergeError) -> None:
    """`path`, an output to write, can be created: its nearest existing ancestor is a folder
    this process may write in. Checked before any work, so a bad output path wastes none."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"{path}: {ancestor} is a file, not a folder; choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise error(f"{path}: cannot write in {ancestor} (permission denied); choose another path")
