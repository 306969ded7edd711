"""The one error type users see: a one-line message naming the problem and the fix."""


class MergeError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""
