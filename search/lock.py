"""One writer per output folder: a search holds an exclusive lock on the folder itself while it
runs, so a second search on the same folder fails at once instead of mixing its trials in. The
lock lives in the kernel (flock on the folder), so deleting a file cannot defeat it; the holder's
pid is written to `OUT/.evomerge.lock` for the message. (Searches that share a database study on
purpose use owners and heartbeats instead.)"""

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
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = (out / LOCK_FILE).read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise SearchError(
                f"{out}: another evomerge search (pid {holder}) is writing this folder; wait "
                "for it to finish, or choose another --out"
            ) from None
        (out / LOCK_FILE).write_text(f"{os.getpid()}\n")
        yield
    finally:
        os.close(fd)  # closing releases the lock
