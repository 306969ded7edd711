"""Shared fixtures: tiny untrained families, the shipped, trained demo family and a real
pretrained family (SmolLM2-135M-Instruct and experts derived from it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from families import TinyFamily, build_tiny_family


@pytest.fixture
def tiny_family(tmp_path_factory) -> Callable[..., TinyFamily]:
    """A factory: `tiny_family(arch="mistral", seed=3, extra_vocab=True)` builds a fresh family."""

    def make(**kwargs) -> TinyFamily:
        return build_tiny_family(tmp_path_factory.mktemp("tiny_family"), **kwargs)

    return make


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_family() -> Path:
    """The trained demo family as shipped in demo/family (tests read it, never write it)."""
    return REPO / "demo" / "family"


@pytest.fixture(scope="session")
def smol_family():
    """SmolLM2-135M-Instruct in bf16 with tied embeddings, and two experts derived from it
    (tests/real_family.py): built on first use into the cache, read-only for tests."""
    from real_family import real_family

    return real_family()


@pytest.fixture(scope="module")
def offline_single_thread():
    """No downloads; and one thread, set before module fixtures score anything: with tiny
    matrices a second intra-op thread only adds synchronization (on a busy machine, a lot)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


class PostgresServer:
    """A PostgreSQL server on loopback from the Debian package's binaries (as the postgres user
    when root), in its own temporary folder; `stop()` and `start()` it at will."""

    def __init__(self) -> None:
        import glob
        import shutil
        import socket
        import tempfile

        found = shutil.which("initdb") or next(
            iter(glob.glob("/usr/lib/postgresql/*/bin/initdb")), ""
        )
        if not found:
            message = "no PostgreSQL server binaries (initdb); apt-get install postgresql"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        bin_dir = Path(os.path.realpath(found)).parent
        self.data = data = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
        data.chmod(0o755)
        as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(data, "postgres", "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        initdb = [*as_user, bin_dir / "initdb", "-D", data / "db", "-A", "trust", "-U", "evomerge"]
        self._quiet(initdb)
        self.options = f"-p {port} -k {data} -h 127.0.0.1"
        self.ctl = [*as_user, bin_dir / "pg_ctl", "-D", data / "db", "-l", data / "log", "-w"]
        self.url = f"postgresql://evomerge@127.0.0.1:{port}/postgres"
        self.start()

    @staticmethod
    def _quiet(command: list) -> None:
        import subprocess

        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=True)

    def start(self) -> None:
        self._quiet([*self.ctl, "-o", self.options, "start"])

    def stop(self) -> None:
        self._quiet([*self.ctl, "-m", "immediate", "stop"])

    def remove(self) -> None:
        import shutil
        import subprocess

        with contextlib.suppress(subprocess.CalledProcessError):  # a test may have stopped it
            self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server for the session: $EVOMERGE_TEST_POSTGRES when set, else one started
    here (PostgresServer)."""
    url = os.environ.get("EVOMERGE_TEST_POSTGRES")
    if url:
        yield url
        return
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.remove()


@pytest.fixture
def postgres_server():
    """A server of the test's own, to stop and start."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.remove()
