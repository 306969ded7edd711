"""Faults: one writer per output folder, an --overwrite that never leaves the output missing,
what an interrupted write left cleared (or restored) by the next one; a search whose sources
change under it. Signals mid-merge: tests/test_hostile_inputs.py (test_a_signal_mid_merge_...);
a kill while Optuna draws a trial: tests/test_optimizer_contract.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import (
    EACH_BACKEND,
    HashExecutor,
    content,
    run,
    search_on,
    trials_of,
    write_recipe,
)
from safetensors.torch import load_file, save_file

import evomerge.merge.staging as staging
from evomerge.merge.errors import MergeError, allocation_failure_line
from evomerge.merge.refs import source_identity
from evomerge.merge.staging import recover_leftovers, staged_dir
from evomerge.search.config import load_search_recipe
from evomerge.search.errors import SearchError
from evomerge.search.lock import LOCK_FILE, output_lock
from evomerge.search.loop import Search


def write_folder(path, text: str) -> None:
    path.mkdir()
    (path / "weights").write_text(text)


def read_folder(path) -> str:
    return (path / "weights").read_text()


def hidden(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_and_leaves_nothing_beside(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_folder(out, "old")
    with staged_dir(out) as new:
        (new / "weights").write_text("new")
        assert read_folder(out) == "old"  # the previous output stays until the new one is ready
    assert read_folder(out) == "new" and hidden(tmp_path) == []


def test_the_swap_is_atomic_where_the_file_system_allows(tmp_path):
    """On Linux file systems with renameat2 (ext4, tmpfs, xfs, btrfs) the output is never
    missing: the previous folder is never renamed aside."""
    out, new = tmp_path / "out", tmp_path / "new"
    write_folder(out, "old")
    write_folder(new, "new")
    if not staging._exchange(new, out):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    assert read_folder(out) == "new" and read_folder(new) == "old"


def test_without_overwrite_an_output_that_appeared_meanwhile_is_kept(tmp_path):
    out = tmp_path / "out"
    write_folder(out, "someone else's")
    with (
        pytest.raises(MergeError, match="already exists; pass --overwrite"),
        staged_dir(out, overwrite=False),
    ):
        pass
    assert read_folder(out) == "someone else's" and hidden(tmp_path) == []


def test_an_error_while_staging_removes_the_stage_and_keeps_the_output(tmp_path):
    out = tmp_path / "out"
    write_folder(out, "old")
    with pytest.raises(OSError, match="disk full"), staged_dir(out) as new:
        (new / "weights").write_text("half")
        raise OSError(28, "disk full")
    assert read_folder(out) == "old" and hidden(tmp_path) == []


def test_a_second_writer_refuses_in_one_line(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out):
        refused = pytest.raises(MergeError, match=r"another evomerge process \(pid \d+\)")
        with refused, staged_dir(out):
            pass
    assert out.is_dir() and hidden(tmp_path) == []


def test_a_writer_in_another_process_holds_the_lock_until_it_exits(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from evomerge.merge.staging import staged_dir
            with staged_dir(Path({str(out)!r})):
                print("staging", flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "staging"
        with pytest.raises(MergeError, match=f"pid {holder.pid}"), staged_dir(out):
            pass
    finally:
        holder.communicate("\n", timeout=60)
    with staged_dir(out) as new:  # released: the next writer goes ahead
        (new / "weights").write_text("mine")
    assert read_folder(out) == "mine" and hidden(tmp_path) == []


def test_a_kill_between_the_two_renames_is_restored_by_the_next_write(tmp_path, capsys):
    """What SIGKILL between `OUT -> .OUT.old-*` and `.OUT.partial-* -> OUT` leaves (on a file
    system without renameat2): the next write puts the previous output back, then goes on."""
    out = tmp_path / "out"
    write_folder(tmp_path / ".out.old-1234abcd", "previous")
    write_folder(tmp_path / ".out.partial-5678abcd", "unconfirmed")
    recover_leftovers(out)
    assert read_folder(out) == "previous" and hidden(tmp_path) == []
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{out}: restored the previous output from .out.old-1234abcd, left by an " \
        "interrupted --overwrite"
    assert err[1].startswith(f"{out}: removed what an interrupted write left: .out.partial-")


def test_leftovers_beside_a_complete_output_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    write_folder(out, "current")
    write_folder(tmp_path / ".out.old-1234abcd", "older")
    write_folder(tmp_path / ".out.partial-5678abcd", "partial")
    write_folder(tmp_path / ".other.partial-5678abcd", "another output's")
    with pytest.raises(MergeError, match="already exists"), staged_dir(out, overwrite=False):
        pass
    assert read_folder(out) == "current" and hidden(tmp_path) == [".other.partial-5678abcd"]
    assert "removed what an interrupted write left" in capsys.readouterr().err


# --- sources under a search ----------------------------------------------------------------------


def nudge_weights(folder: Path) -> None:
    """Retrain-like change: every value moves, the header (names, shapes, dtypes) stays."""
    file = folder / "model.safetensors"
    tensors = {name: value + 0.01 for name, value in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})


def test_a_sources_identity_follows_its_bytes(demo_family, tmp_path):
    copy = tmp_path / "expert_a"
    shutil.copytree(demo_family / "expert_a", copy)
    assert source_identity(str(copy)) == source_identity(str(demo_family / "expert_a"))
    before = source_identity(str(copy))
    (copy / "model.safetensors").touch()  # rewritten with the same bytes: the same source
    assert source_identity(str(copy)) == before
    nudge_weights(copy)
    assert source_identity(str(copy)) != before


@pytest.fixture
def own_family(demo_family, tmp_path) -> Path:
    """A copy of the demo family that a test may change."""
    family = tmp_path / "family"
    for name in ("base", "expert_a", "expert_b"):
        shutil.copytree(demo_family / name, family / name)
    return family


def test_resume_refuses_a_study_whose_sources_changed(own_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", own_family, budget={"evaluations": 4})
    out = tmp_path / "out"
    short = write_recipe(tmp_path / "short.yaml", own_family, budget={"evaluations": 2})
    run(short, out, write_model=False, executor=HashExecutor(["demo_combined"]))
    nudge_weights(own_family / "expert_a")
    with pytest.raises(SearchError, match=r"the sources changed since the study began \(.*"
                       r"expert_a\); restore them, or pass --allow-changed-sources"):  # fmt: skip
        run(recipe, out, resume=True, write_model=False, executor=HashExecutor(["demo_combined"]))
    assert len(trials_of(out)) == 2
    summary = run(recipe, out, resume=True, write_model=False, allow_changed_sources=True,
                  executor=HashExecutor(["demo_combined"]))  # fmt: skip
    assert len(summary.trials) == 4
    attrs = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{out / 'study.db'}")
    changed = attrs.user_attrs["sources_changed"]
    assert changed == [{"after_trial": 2, "sources": [str(own_family / "expert_a")]}]


class ChangingExecutor(HashExecutor):
    """Scores like HashExecutor; changes a source's file while the second candidate runs."""

    def __init__(self, source: Path):
        super().__init__(["demo_combined"])
        self.source = source

    def evaluate(self, candidates, tickets):
        for outcome in super().evaluate(candidates, tickets):
            if self.evaluated == 2:
                nudge_weights(self.source)
            yield outcome


def test_a_source_changed_during_a_search_stops_it_before_the_final_step(own_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", own_family, budget={"evaluations": 4})
    out = tmp_path / "out"
    expert = own_family / "expert_b"
    original = (expert / "model.safetensors").read_bytes()
    with pytest.raises(SearchError, match=r"expert_b changed while the search ran, before the "
                       "final scores; the study is kept"):  # fmt: skip
        run(recipe, out, write_model=False, executor=ChangingExecutor(expert))
    assert len(trials_of(out)) == 4 and not (out / "scores.json").exists()
    (expert / "model.safetensors").write_bytes(original)  # restored: --resume redoes the end
    executor = HashExecutor(["demo_combined"])
    summary = run(recipe, out, resume=True, write_model=False, executor=executor)
    assert len(summary.trials) == 4 and executor.evaluated == 0
    assert (out / "scores.json").is_file()


def test_deleting_the_lock_file_does_not_let_a_second_search_in(demo_family, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 2})
    with output_lock(out):
        (out / LOCK_FILE).unlink()
        with pytest.raises(SearchError, match="another evomerge search"):
            run(recipe, out, write_model=False, executor=HashExecutor(["demo_combined"]))
    assert not (out / "study.db").exists()


# --- the study ----------------------------------------------------------------------------------


def test_a_study_locked_past_the_wait_is_one_line_and_resume_then_finishes(
    demo_family, tmp_path, monkeypatch
):
    import sqlite3

    import evomerge.search.journal as journal

    monkeypatch.setattr(journal, "SQLITE_LOCK_SECONDS", 0.5)
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 4})
    short = write_recipe(tmp_path / "short.yaml", demo_family, budget={"evaluations": 2})
    out = tmp_path / "out"
    run(short, out, write_model=False, executor=HashExecutor(["demo_combined"]))
    holder = sqlite3.connect(out / "study.db")
    holder.execute("BEGIN EXCLUSIVE")  # another process writing the study, for too long
    try:
        with pytest.raises(SearchError) as info:
            run(recipe, out, resume=True, write_model=False,
                executor=HashExecutor(["demo_combined"]))  # fmt: skip
    finally:
        holder.rollback()
        holder.close()
    message = str(info.value)  # where it met the lock: opening the study, or writing to it
    assert "\n" not in message and "database is locked (another process held it for over 0.5 s)"\
        in message and "--resume" in message
    summary = run(recipe, out, resume=True, write_model=False,
                  executor=HashExecutor(["demo_combined"]))  # fmt: skip
    assert len(summary.trials) == 4


def test_a_lock_shorter_than_the_wait_is_waited_out(demo_family, tmp_path):
    import sqlite3
    import threading

    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 4})
    short = write_recipe(tmp_path / "short.yaml", demo_family, budget={"evaluations": 2})
    out = tmp_path / "out"
    run(short, out, write_model=False, executor=HashExecutor(["demo_combined"]))
    holder = sqlite3.connect(out / "study.db", check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.0, holder.rollback).start()
    summary = run(recipe, out, resume=True, write_model=False,
                  executor=HashExecutor(["demo_combined"]))  # fmt: skip
    holder.close()
    assert len(summary.trials) == 4


class HeldOutBreaks(HashExecutor):
    """Scores the search; its held-out metric raises when the best merge is judged."""

    def score(self, candidate, split):
        if split == "heldout":
            raise ZeroDivisionError("the metric divided by zero")
        return super().score(candidate, split)


def test_a_failure_while_judging_the_best_merge_keeps_the_study(demo_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 4})
    out = tmp_path / "out"
    with pytest.raises(SearchError) as info:
        run(recipe, out, write_model=False, executor=HeldOutBreaks(["demo_combined"]))
    assert str(info.value) == (
        f"{out}: the search finished (4 trials recorded) but its final step failed: "
        "ZeroDivisionError: the metric divided by zero; fix that and run the search again with "
        "--resume to redo only the final scores, model and report"
    )
    executor = HashExecutor(["demo_combined"])
    summary = run(recipe, out, resume=True, write_model=False, executor=executor)
    assert executor.evaluated == 0 and len(summary.trials) == 4
    assert (out / "report.md").is_file()


def test_a_disk_without_room_for_the_model_is_refused_before_the_first_trial(
    demo_family, tmp_path, monkeypatch
):
    import evomerge.search.loop as loop

    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 2})
    out = tmp_path / "out"
    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: full)
    with pytest.raises(SearchError, match=r"need about 0\.\d\d GiB, the disk has 0\.00 GiB free"):
        run(recipe, out, write_model=True, executor=HashExecutor(["demo_combined"]))
    assert not (out / "study.db").exists()  # refused before the study was made


def test_a_searcher_whose_process_is_gone_is_taken_over_at_once(demo_family, tmp_path):
    """On a shared study (PostgreSQL), a searcher SIGKILLed on this host leaves a fresh
    heartbeat; its process is provably gone, so its running trials are orphans now, not after
    the 10-minute silence. A live one's are left alone, and so is a trial asked a moment ago
    whose owner is not yet set (CI once saw a second searcher take one and both tell it)."""
    from evomerge.search.journal import Journal

    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 2})
    out = tmp_path / "out"
    run(recipe, out, write_model=False, executor=HashExecutor(["demo_combined"]))
    search = Search.prepare(load_search_recipe(recipe), out)

    def journal() -> Journal:
        j = Journal(search.storage, "evomerge", search.space.genes, search.objectives,
                    search.recipe.fingerprint(), resume=True)  # fmt: skip
        j.stale_after = 600.0  # as on a shared storage
        return j

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    searchers = {"killed": int(dead.stdout), "alive": os.getpid()}
    for name, pid in searchers.items():
        other = journal()
        other.owner = name
        other.beat()
        other.study.set_user_attr(f"process.{name}", f"{socket.gethostname()}:{pid}")
        trial = other.study.ask()
        trial.set_user_attr("owner", name)
    unclaimed = journal().study.ask()  # asked by "alive", its owner not yet set
    me = journal()
    assert me.live_owners() == ["alive"]
    assert [t.user_attrs.get("owner") for t in me.orphaned()] == ["killed"]
    me.study.set_user_attr("heartbeat.alive", 0.0)  # no one left to claim the unclaimed one
    assert [t.number for t in me.orphaned()][-1] == unclaimed.number


class ServerStops(HashExecutor):
    """Stops the database `server` as the `at`-th candidate is scored, and starts it again
    `after` seconds later (None: not at all)."""

    def __init__(self, server, at: int, after: float | None):
        super().__init__(["demo_combined"])
        self.server, self.at, self.after = server, at, after
        self.stopped = False

    def run(self, candidate, ticket):
        if self.evaluated == self.at and not self.stopped:
            self.server.stop()
            self.stopped = True
            if self.after is not None:
                threading.Timer(self.after, self.server.start).start()
        return super().run(candidate, ticket)


def study_content(server_url: str, study: str) -> list[tuple]:
    trials = optuna.load_study(study_name=study, storage=server_url).get_trials()
    return [content(t) for t in sorted(trials, key=lambda t: t.number)]


@pytest.mark.slow
def test_a_database_server_restarting_mid_search_is_waited_out(
    demo_family, tmp_path, postgres_server
):
    """PostgreSQL stopped while a candidate is scored and back nine seconds later (longer than
    Optuna's own retries of a new trial, at most 8 s): the search reconnects and finishes with
    the trials of a run that saw no restart."""
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 8})
    url = postgres_server.url
    search_on(url, "calm", recipe, tmp_path / "calm", executor=HashExecutor(["demo_combined"]))
    executor = ServerStops(postgres_server, at=3, after=9.0)
    search_on(url, "restarted", recipe, tmp_path / "restarted", executor=executor)
    assert executor.stopped
    assert study_content(url, "restarted") == study_content(url, "calm")


@pytest.mark.slow
def test_a_database_server_gone_past_the_wait_is_one_line_and_resume_finishes(
    demo_family, tmp_path, postgres_server, monkeypatch
):
    import evomerge.search.journal as journal

    monkeypatch.setattr(journal, "SERVER_RETRY_SECONDS", 1.0)
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 8})
    url, out = postgres_server.url, tmp_path / "gone"
    search_on(url, "calm", recipe, tmp_path / "calm", executor=HashExecutor(["demo_combined"]))
    with pytest.raises(SearchError) as stopped:
        search_on(url, "gone", recipe, out, executor=ServerStops(postgres_server, 3, None))
    message = str(stopped.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"{url}: the study's database failed: ") and "--resume" in message
    postgres_server.start()
    # The stopped searcher exited with 2 (here: it ran in this process, which lives on).
    monkeypatch.setattr(journal, "_pid_alive", lambda pid: pid != os.getpid())
    search_on(url, "gone", recipe, out, executor=HashExecutor(["demo_combined"]), resume=True)
    assert study_content(url, "gone") == study_content(url, "calm")


@pytest.mark.parametrize("command", ["search", "eval"])
def test_a_low_address_space_limit_is_one_line_not_a_hang(command, tmp_path):
    """Under a 2 GB address-space limit (ulimit -v) OpenBLAS, loaded by a search's libraries,
    spins forever as it starts: the command refuses first, in one line, and writes nothing."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    args = {
        "search": ["recipes/demo.yaml", "--out", str(out)],
        "eval": ["demo/family/base", "--tasks", "demo_mixed", "--output", str(out)],
    }[command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "evomerge", command, *args], cwd=repo, env=env,
        preexec_fn=limit, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = f"error: {command}: the address-space limit (ulimit -v) is 2.0 GiB, below the 3 GiB"
    assert done.stderr.startswith(line) and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_host_memory_torch_cannot_get_is_one_line():
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB
    assert allocation_failure_line(failed.value) == (
        "evomerge: could not allocate 1,125,899,906,842,624 bytes of host memory; out of memory: "
        "free memory, or raise the limit (ulimit -v)"
    )
    assert allocation_failure_line(RuntimeError("The size of tensor a (2) must match")) is None
    assert allocation_failure_line(ImportError("No module named 'mergekit'")) is None


MERGE_UNDER_A_LIMIT = """
import resource, sys
import torch, evomerge.merge.materialize, evomerge.merge.writer
from evomerge.cli import main
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, resource.RLIM_INFINITY))
sys.argv = ["evomerge", "merge", {recipe!r}, {out!r}]
main()
"""


@pytest.mark.slow
def test_a_source_that_cannot_be_mapped_is_one_line(smol_family, tmp_path):
    """With less address space left than a source's file (here 269 MB), mapping it fails in
    torch (a RuntimeError): one line naming the file, exit 2, no output and no partial left."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(smol_family.base),
        "models": [{"model": str(expert), "parameters": {"weight": 1.0}}
                   for expert in smol_family.experts],
        "dtype": "bfloat16",
    }))  # fmt: skip
    out = tmp_path / "out"
    script = MERGE_UNDER_A_LIMIT.format(headroom=400 * 2**20, recipe=str(recipe), out=str(out))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("merging")]
    source = smol_family.base / "model.safetensors"
    remedy = "out of memory: free memory, or raise the limit (ulimit -v)"
    size = source.stat().st_size
    assert lines == [f"error: {source}: cannot map its {size:,} bytes into memory; {remedy}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


class StudyDeleted(HashExecutor):
    """Deletes the search's study, or its SQLite file (as another process might), as the
    `at`-th candidate is scored."""

    def __init__(self, out: Path, at: int, file: bool):
        super().__init__(["demo_combined"])
        self.out, self.at, self.file = out, at, file

    def run(self, candidate, ticket):
        if self.evaluated == self.at and self.file:
            (self.out / "study.db").unlink()
        elif self.evaluated == self.at:
            storage = f"sqlite:///{self.out / 'study.db'}"
            optuna.delete_study(study_name="evomerge", storage=storage)
        return super().run(candidate, ticket)


@pytest.mark.parametrize("file", [False, True], ids=["study", "database-file"])
def test_a_study_deleted_mid_search_stops_it_in_one_line(file, demo_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, budget={"evaluations": 8})
    out = tmp_path / "out"
    with pytest.raises(SearchError) as stopped:
        run(recipe, out, write_model=False, executor=StudyDeleted(out, at=3, file=file))
    message = str(stopped.value)
    what = "the study's database file" if file else "study 'evomerge'"
    assert message.startswith(f"sqlite:///{out / 'study.db'}: {what} was deleted while the search")
    assert "\n" not in message and message.endswith("run the search again without --resume")
    run(recipe, out, write_model=False, executor=HashExecutor(["demo_combined"]))  # as it says
    assert len(trials_of(out)) == 8


KILLED_SEARCHER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import HashExecutor, search_on


class Dies(HashExecutor):
    def run(self, candidate, ticket):
        if self.evaluated == {at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(candidate, ticket)


search_on({url!r}, {study!r}, Path({recipe!r}), Path({out!r}), executor=Dies(["demo_combined"]))
"""


@pytest.mark.slow
@EACH_BACKEND
def test_a_searcher_sigkilled_on_a_shared_study_resumes_to_the_uninterrupted_run(
    optimizer, demo_family, tmp_path, postgres_server
):
    """SIGKILL mid-trial on PostgreSQL: the killed searcher's heartbeat is fresh (and with Optuna
    its trial RUNNING); `--resume` on this host sees its process gone, takes over at once and
    scores the trial it died in, so the study ends as a run that was never killed (no 10-minute
    wait, no lost trial)."""
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, optimizer=optimizer,
                          budget={"evaluations": 8})  # fmt: skip
    url, out = postgres_server.url, tmp_path / "killed"
    search_on(url, "calm", recipe, tmp_path / "calm", executor=HashExecutor(["demo_combined"]))
    script = KILLED_SEARCHER.format(tests=str(Path(__file__).parent), at=3, recipe=str(recipe),
                                    out=str(out), url=url, study="killed")  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    trials = optuna.load_study(study_name="killed", storage=url).get_trials()
    states = [t.state.name for t in trials]
    # Optuna's trial is asked before it is scored (left RUNNING); Nevergrad's is stored when told.
    dying = ["RUNNING"] if optimizer.get("backend") == "optuna" else []
    assert states == ["COMPLETE"] * 3 + dying
    search_on(url, "killed", recipe, out, executor=HashExecutor(["demo_combined"]), resume=True)
    assert study_content(url, "killed") == study_content(url, "calm")
