"""Shared fixtures: tiny untrained families and the trained demo family."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from families import TinyFamily, build_tiny_family


@pytest.fixture
def tiny_family(tmp_path_factory) -> Callable[..., TinyFamily]:
    """A factory: `tiny_family(arch="mistral", seed=3, extra_vocab=True)` builds a fresh family."""

    def make(**kwargs) -> TinyFamily:
        return build_tiny_family(tmp_path_factory.mktemp("tiny_family"), **kwargs)

    return make


@pytest.fixture(scope="session")
def demo_family(tmp_path_factory) -> Path:
    """The trained demo family, built once per session (a few minutes) or reused from
    $EVOMERGE_CACHE when that is set."""
    from evomerge.demo_family import ensure_demo_family

    cache = os.environ.get("EVOMERGE_CACHE")
    return ensure_demo_family(Path(cache) if cache else tmp_path_factory.mktemp("evomerge_cache"))
