"""The one error type users see: a one-line message naming the problem and the fix."""

import errno
import re


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


def allocation_failure_line(exc: BaseException) -> str | None:
    """torch reports host memory it could not get (an mmap of a source, an allocation) as a
    RuntimeError, and a library that cannot be mapped as it loads lazily is an ImportError: the
    one line for either, or None when `exc` is something else."""
    text = str(exc)
    remedy = _REMEDIES[errno.ENOMEM]
    if library := re.match(r"(\S+): failed to map segment from shared object", text):
        return f"{library[1]}: cannot map the library into memory; {remedy}"
    if mapped := re.search(r"unable to mmap (\d+) bytes from file <(.*?)>", text):
        return f"{mapped[2]}: cannot map its {int(mapped[1]):,} bytes into memory; {remedy}"
    if "can't allocate memory" in text or "Cannot allocate memory" in text:
        size = re.search(r"allocate (\d+) bytes", text)
        what = f" {int(size[1]):,} bytes" if size else ""
        return f"evomerge: could not allocate{what} of host memory; {remedy}"
    return None
