"""Writes that readers never see half-made: a folder is built in a hidden sibling
(`.NAME.partial-XXXXXXXX`) and swapped into place when complete; a file is written beside its
target, flushed to disk and replaced in one step. An interrupted write leaves nothing that looks
complete, and the next write to the same folder clears (or restores) what it left.

One writer per output folder: `staged_dir` holds an exclusive lock on `.NAME.lock` beside it
for the whole write, so a second process writing the same folder refuses at once."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge.merge.errors import MergeError


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextmanager
def staged_dir(out_dir: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """A fresh hidden folder beside `out_dir` to build into, under the folder's write lock; on
    success it replaces `out_dir` (the previous folder stays reachable until the new one is in
    place), on any error or interrupt it is deleted. Refuses when another process holds the
    lock, or when `out_dir` exists (or appeared meanwhile) and `overwrite` is false."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _write_lock(out_dir):
        recover_leftovers(out_dir)
        if out_dir.exists() and not overwrite:
            raise MergeError(f"{out_dir}: already exists; pass --overwrite to replace it")
        staging = _sibling(out_dir, "partial")
        staging.mkdir()
        try:
            yield staging
            move_into_place(staging, out_dir)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _as_output(exc, staging, out_dir) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _as_output(exc: OSError, staging: Path, out_dir: Path) -> OSError:
    """An OS refusal about a staged file, naming the output's file instead (the staged copy is
    gone by the time anyone reads the message)."""
    if exc.filename is None or not str(exc.filename).startswith(str(staging)):
        return exc
    inside = str(exc.filename)[len(str(staging)) :].lstrip("/")
    return OSError(exc.errno, exc.strerror, str(out_dir / inside) if inside else str(out_dir))


@contextmanager
def _write_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive flock on `.NAME.lock` beside `out_dir`, removed on release. A lock file
    unlinked by its previous holder between our open and our flock is not the lock: reopen."""
    path = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MergeError(
                f"{out_dir}: another evomerge process (pid {holder}) is writing this folder; "
                "wait for it to finish, or choose another output folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiter then reopens a fresh file
        os.close(fd)


def recover_leftovers(out_dir: Path) -> None:
    """Clear what an interrupted write to `out_dir` left beside it (call under its lock): a
    `.NAME.partial-*` is never complete for sure, so it goes; a `.NAME.old-*` is the previous
    output of an interrupted swap: put back when `out_dir` is missing, removed otherwise."""
    leftovers = sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*"))
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not out_dir.exists() and olds:
        restored = olds.pop()
        restored.rename(out_dir)
        _say(f"{out_dir}: restored the previous output from {restored.name}, left by an "
             "interrupted --overwrite")  # fmt: skip
    for path in [*leftovers, *olds]:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if leftovers or olds:
        names = ", ".join(p.name for p in [*leftovers, *olds])
        _say(f"{out_dir}: removed what an interrupted write left: {names}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def move_into_place(staging: Path, out_dir: Path) -> None:
    """`staging` becomes `out_dir`. A previous `out_dir` is exchanged with it in one atomic
    step where the file system allows (Linux renameat2), so `out_dir` is never missing; else it
    is first renamed to `.NAME.old-*`, which the next write restores if we die in between."""
    _fsync_dir(staging)
    if out_dir.exists() and _exchange(staging, out_dir):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the previous output
    else:
        old = None
        if out_dir.exists():
            old = _sibling(out_dir, "old")
            out_dir.rename(old)
        staging.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out_dir.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk, so a rename that follows cannot outrun them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write a text file whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "partial")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # a resume reads these files: on disk before the rename
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
