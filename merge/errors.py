"""The one error type users see: a one-line message naming the problem and the fix."""

import errno


class MergeError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


def first_line(exc: BaseException, *, with_type: bool = False, limit: int = 500) -> str:
    """An exception's message cut to its first line (its type name when it has none), for the
    one-line errors and failure records; `with_type` puts the type name first."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if with_type:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (text or type(exc).__name__)[:limit]


_REMEDIES = {
    errno.ENOSPC: "free space on that disk, or write elsewhere",
    errno.EDQUOT: "free space within your disk quota, or write elsewhere",
    errno.EFBIG: "a file-size limit (ulimit -f, or the file system's) stopped it: raise the "
    "limit, or write smaller shards (--out-shard-size)",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
    errno.ENFILE: "the whole system is at its open-file limit: close some programs",
    errno.EROFS: "a read-only file system: write elsewhere",
    errno.EACCES: "write elsewhere, or fix the permissions",
    errno.EPERM: "an immutable file or folder (lsattr)? write elsewhere",
    errno.ENOMEM: "out of memory: free memory, or raise the limit (ulimit -v)",
}


def os_error_line(exc: OSError) -> str:
    """An operating-system refusal (disk full, a limit, a read-only or immutable output) as one
    line: the path, what the system said, and the remedy."""
    where = exc.filename if exc.filename is not None else "evomerge"
    said = exc.strerror or first_line(exc)
    remedy = _REMEDIES.get(exc.errno or 0, "fix the cause and run the command again")
    return f"{where}: {said}; {remedy}"
