"""The one error type users see: a one-line message naming the problem and the fix."""


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
