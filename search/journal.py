"""The trial record: an Optuna study in any Optuna storage (SQLite in the output folder by
default), so `optuna-dashboard <storage>` reads a search while it runs.

Each finished trial holds its genome as Optuna parameters (one per gene, in parameter units),
the fitness as its value (the per-task vector for multi-objective samplers), and as user
attributes: the per-task scores and stderrs, the fitness, timings, the recipe hash, the
generation and, for a failed candidate, the error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import socket
import time
import uuid
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from evomerge.merge.errors import first_line
from evomerge.merge.recipe import Recipe
from evomerge.search.errors import SearchError
from evomerge.search.records import Gene, Outcome, TrialRecord

optuna.logging.set_verbosity(logging.WARNING)
STALE_AFTER_SECONDS = 600.0  # a shared study's running trial is orphaned after this silence
SQLITE_LOCK_SECONDS = 60.0  # how long a write waits for another process's lock on study.db
SERVER_RETRY_SECONDS = 120.0  # how long a search waits for a database server that went away


def _rdb_storage(storage: str) -> str | optuna.storages.BaseStorage:
    """The storage to open: SQLite waits out another process's write lock, within bounds; a
    database server (PostgreSQL, MySQL) that restarts or goes away is reconnected to, retried
    for SERVER_RETRY_SECONDS, before the search stops with one line."""
    if storage.startswith("sqlite"):
        connect = {"timeout": SQLITE_LOCK_SECONDS}
        return optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": connect})
    if not storage.startswith(("postgresql", "mysql")):
        return storage
    from sqlalchemy import event

    # pool_pre_ping: a pooled connection the server dropped is noticed at checkout and replaced
    rdb = optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
    event.listen(rdb.engine, "do_connect", _connect_within_bounds)
    return rdb


def _connect_within_bounds(dialect, connection_record, cargs, cparams):
    """SQLAlchemy's connect, retried with backoff while the server refuses, for a bounded time."""
    deadline = time.monotonic() + SERVER_RETRY_SECONDS
    delay = 0.25
    while True:
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def _open_study(storage: str, study_name: str, directions: list[str]) -> optuna.Study:
    """Create or load the study. Searchers starting together on a new database race to create
    Optuna's tables and the study; the loser of such a race retries and loads what the winner
    made."""
    for attempt in range(5):
        try:
            where = _rdb_storage(storage)  # it creates Optuna's tables: inside the race
            return optuna.create_study(
                storage=where, study_name=study_name, directions=directions, load_if_exists=True
            )
        except (ImportError, ValueError):
            raise
        except Exception as exc:
            if attempt == 4 or "locked" in str(exc):  # a lock was already waited for
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def storage_problem(exc: BaseException, storage: str) -> str:
    """What a storage error says, in one line, without the password."""
    problem = scrub(first_line(exc), storage)
    if "database is locked" in problem:
        problem += f" (another process held it for over {SQLITE_LOCK_SECONDS:g} s)"
    return problem


def redact(storage: str) -> str:
    """A storage URL without its password."""
    if "://" in storage and "@" in storage:
        scheme, rest = storage.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"
    return storage


def scrub(text: str, storage: str) -> str:
    """`text` (a driver's error) without the storage URL's password, whole or in pieces: a
    password holding an unescaped `@`, `:` or `/` is split by URL parsers, and the pieces end
    up in host names and messages."""
    if "://" not in storage or "@" not in storage:
        return text
    creds = storage.split("://", 1)[1].rsplit("@", 1)[0]
    if ":" not in creds:
        return text
    password = creds.split(":", 1)[1]
    pieces = [password, *re.split(r"[@:/]", password)]
    for piece in sorted((p for p in pieces if len(p) >= 3), key=len, reverse=True):
        text = text.replace(piece, "***")
    return text


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16]


class Journal:
    def __init__(
        self,
        storage: str,
        study_name: str,
        genes: list[Gene],
        objectives: list[str],
        fingerprint: str,
        *,
        multi_objective: bool = False,
        resume: bool = False,
        where: str = "",
    ):
        self.genes = genes
        self.objectives = objectives
        self.multi_objective = multi_objective
        directions = ["maximize"] * (len(objectives) if multi_objective else 1)
        try:
            self.study = _open_study(storage, study_name, directions)
        except ImportError:
            raise SearchError(
                f"storage {redact(storage)}: its database driver is not installed "
                "(PostgreSQL: pip install 'evomerge[postgres]')"
            ) from None
        except ValueError as exc:  # directions differ from the stored study's
            problem = scrub(str(exc), storage)
            raise SearchError(
                f"{where}study {study_name!r} in {redact(storage)}: {problem}"
            ) from None
        except Exception as exc:  # the database is unreachable, refuses us, is locked, ...
            problem = storage_problem(exc, storage)
            raise SearchError(
                f"storage {redact(storage)}: cannot open it: {problem}; fix that and run again "
                "(--resume continues a study)"
            ) from None
        attrs = self.study.user_attrs
        stored = attrs.get("fingerprint")
        n_trials = len(self.study.get_trials(deepcopy=False))
        if n_trials == 0:  # new, or a search that stopped before its first trial: start afresh
            self.study.set_user_attr("fingerprint", fingerprint)
            self.study.set_user_attr("genes", [g.name for g in genes])
            self.study.set_user_attr("objectives", objectives)
        elif not resume:
            raise SearchError(
                f"{where}study {study_name!r} in {redact(storage)} already holds {n_trials} "
                "trials; pass --resume to continue it, or choose another --out or study name"
            )
        elif stored != fingerprint:
            raise SearchError(
                f"{where}study {study_name!r} in {redact(storage)} was made by a different search "
                "recipe (merge, space, fitness, optimizer or seed changed); start a new study"
            )
        self.distributions = {g.name: FloatDistribution(g.low, g.high) for g in genes}
        self.owner = uuid.uuid4().hex[:12]
        self._announced = False
        # A SQLite study lives in one output folder, written by one process at a time; other
        # storages may be shared by several searchers, which beat while they work.
        self.stale_after = 0.0 if storage.startswith("sqlite") else STALE_AFTER_SECONDS

    # --- reading ---------------------------------------------------------------------------

    def finished(self) -> list[TrialRecord]:
        """Completed and failed trials, by trial number."""
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        names = [g.name for g in self.genes]
        # Earlier versions failed a trial killed while drawing its parameters: not a candidate.
        done = [t for t in done if all(name in t.params for name in names)]
        return [self.record(t) for t in sorted(done, key=lambda t: t.number)]

    def live_owners(self) -> list[str]:
        """Other searchers that have beaten recently on this (shared) study and whose process
        is not provably gone."""
        attrs = self.study.user_attrs
        return [
            key.removeprefix("heartbeat.")
            for key in attrs
            if key.startswith("heartbeat.") and key != f"heartbeat.{self.owner}"
            and not self._stale(key.removeprefix("heartbeat."), attrs)
        ]  # fmt: skip

    def _stale(self, owner: str | None, attrs: dict[str, Any]) -> bool:
        """A searcher is gone when it has not beaten for a while, or at once when it ran on
        this host and its process no longer exists (SIGKILL, a crash)."""
        if time.time() - attrs.get(f"heartbeat.{owner}", 0.0) > self.stale_after:
            return True
        host, _, pid = str(attrs.get(f"process.{owner}", "")).rpartition(":")
        return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))

    def orphaned(self) -> list[FrozenTrial]:
        """Running trials whose process stopped before telling them: all of them in a SQLite
        study (one process writes it), else those whose owner has not beaten for a while or
        whose process on this host is gone. A trial with no owner yet was asked a moment ago
        (the owner is set just after `ask`) or its process died in between: an orphan only when
        no other searcher is alive to claim it."""
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        attrs = self.study.user_attrs
        nobody_else = self.stale_after == 0 or not self.live_owners()
        orphans = [
            t for t in trials
            if (nobody_else if "owner" not in t.user_attrs
                else self._stale(t.user_attrs["owner"], attrs))
        ]  # fmt: skip
        if len(orphans) < len(trials):
            print(
                f"{len(trials) - len(orphans)} running trials belong to live searchers "
                "(heartbeat within the last "
                f"{self.stale_after:g} s); they are left to them"
            )
        return sorted(orphans, key=lambda t: t.number)

    def beat(self) -> None:
        """Tell other searchers on this study that this process is alive (and, once, which
        process it is: a searcher on the same host can then tell when it is gone)."""
        if self.stale_after > 0:
            if not self._announced:
                process = f"{socket.gethostname()}:{os.getpid()}"
                self.study.set_user_attr(f"process.{self.owner}", process)
                self._announced = True
            self.study.set_user_attr(f"heartbeat.{self.owner}", time.time())

    def n_trials(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def record(self, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        genome = [float(trial.params[g.name]) for g in self.genes]
        outcome = Outcome(
            fitness=attrs.get("fitness"),
            fitness_stderr=attrs.get("fitness_stderr"),
            scores=dict(attrs.get("scores", {})),
            stderrs=dict(attrs.get("stderrs", {})),
            error=attrs.get("error"),
            seconds=dict(attrs.get("seconds", {})),
            decoding=attrs.get("decoding"),
            rows=attrs.get("rows"),
            full=attrs.get("full", True),
            stopped=attrs.get("stopped", False),
            row_values=attrs.get("row_values"),
        )
        return TrialRecord(
            trial.number, int(attrs.get("generation", 0)), genome, outcome, attrs.get("recipe", "")
        )

    # --- writing ---------------------------------------------------------------------------

    def attrs(self, generation: int, outcome: Outcome, recipe: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "generation": generation,
            "fitness": outcome.fitness,
            "fitness_stderr": outcome.fitness_stderr,
            "scores": outcome.scores,
            "stderrs": outcome.stderrs,
            "seconds": {k: round(v, 6) for k, v in outcome.seconds.items()},
            "recipe": recipe,
        }
        if outcome.error is not None:
            attrs["error"] = outcome.error
        if outcome.decoding is not None:
            attrs["decoding"] = outcome.decoding
        if outcome.rows is not None:
            attrs.update(rows=outcome.rows, full=outcome.full, stopped=outcome.stopped)
        if outcome.row_values is not None:
            attrs["row_values"] = outcome.row_values
        return attrs

    def values(self, outcome: Outcome) -> list[float] | None:
        if outcome.failed:
            return None
        if self.multi_objective:
            return [outcome.scores[name] for name in self.objectives]
        return [outcome.fitness]  # type: ignore[list-item]

    def add(self, generation: int, genome: list[float], outcome: Outcome, recipe: str) -> int:
        """Store a finished evaluation proposed outside Optuna (Nevergrad); its trial number."""
        trial = optuna.trial.create_trial(
            state=TrialState.FAIL if outcome.failed else TrialState.COMPLETE,
            params={g.name: value for g, value in zip(self.genes, genome, strict=True)},
            distributions=self.distributions,
            values=self.values(outcome),
            user_attrs=self.attrs(generation, outcome, recipe),
        )
        self.study.add_trial(trial)
        return self.n_trials() - 1

    def get_attr(self, key: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(key, default)

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)
