"""One writer per output folder: a search holds an exclusive lock on `OUT/.evomerge.lock` while it
runs, so a second search on the same folder fails at once instead of mixing its trials in.
(Searches that share a database study on purpose use owners and heartbeats instead.)"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge.search.errors import SearchError

LOCK_FILE = ".evomerge.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise SearchError(
                f"{out}: another evomerge search (pid {holder}) is writing this folder; wait "
                "for it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
