"""The error users see from scoring: one line naming the problem and the fix, exit code 2."""

from __future__ import annotations

from evomerge.merge.errors import MergeError


class EvalError(MergeError):
    """A problem with a task, a fitness spec or an evaluation input (the CLI exits 2)."""
