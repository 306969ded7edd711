"""evomerge: find model merges by evolutionary search."""

__version__ = "0.1.0"
