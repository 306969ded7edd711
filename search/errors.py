"""The error users see from a search: one line naming the problem and the fix, exit code 2."""

from __future__ import annotations

from evomerge.merge.errors import MergeError


class SearchError(MergeError):
    """A problem with a search recipe, its study or its output folder (the CLI exits 2)."""
