"""Finding and building lm-eval tasks by name, with one-line errors for everything that can go
wrong before a model runs: unknown names, broken task YAML, datasets that need a download while
offline, missing or empty data.

The bundled task folder and the user's folders are indexed first (a fraction of a second); lm-eval's
own registry (several seconds to index) only when a name is not found there.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Entry, Kind
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.tasks.manager import TaskDict

from evomerge.evals.errors import EvalError
from evomerge.evals.logfilter import drop_messages
from evomerge.merge.errors import first_line

BUNDLED_TASKS = Path(__file__).resolve().parent / "tasks"
# `datasets` builders that read local files rather than a Hub repository.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "sql", "webdataset"}
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
# Printed for every task with a `custom_dataset` loader (the bundled ones), at every load.
drop_messages("lm_eval.api.task", "Custom kwargs can be passed to `--metadata`")


class TaskCatalog:
    """lm-eval's TaskManager over the bundled tasks, `include_path` and lm-eval's registry."""

    def __init__(self, include_path: Sequence[str | Path] = ()):
        self.folders: list[Path] = []  # the user's
        for path in map(Path, include_path):
            if not path.is_dir():
                raise EvalError(f"{path}: include path is not a folder of task YAML files")
            self.folders.append(path.resolve())
        # Bundled first: lm-eval lets later folders override earlier ones, so the user's win.
        bundled = [BUNDLED_TASKS] if BUNDLED_TASKS.is_dir() else []
        self._indexed = tuple(bundled + self.folders)
        self._local = TaskManager(
            include_path=[str(f) for f in self._indexed], include_defaults=False
        )

    def manager(self, names: Sequence[str]) -> TaskManager:
        """The cheapest TaskManager that knows every name."""
        missing = [name for name in names if name not in self._local.task_index]
        if not missing:
            return self._local
        for name in missing:
            if (broken := self._broken_definition(name)) is not None:
                raise broken
        return _full_manager(self._indexed)

    def check(self, names: Sequence[str]) -> None:
        """Every name is a known task, group or tag (nothing is built, nothing downloaded)."""
        manager = self.manager(names)
        for name in names:
            if name not in manager.task_index:
                raise self._unknown(name, manager)

    def load(self, names: Sequence[str], *, leaf_only: bool = False) -> TaskDict:
        """Build the named tasks, groups or tags; any problem is one EvalError line."""
        manager = self.manager(names)
        merged: TaskDict = {"tasks": {}, "groups": {}, "group_map": {}}
        origin: dict[str, str] = {}
        for name in names:
            entry = manager.task_index.get(name)
            if entry is None:
                raise self._unknown(name, manager)
            if leaf_only and entry.kind not in (Kind.TASK, Kind.PY_TASK):
                raise EvalError(
                    f"{name} is a {entry.kind.name.lower()} of several tasks; a fitness entry "
                    "scores one task: list its tasks one by one"
                )
            if _offline() and _is_hub_dataset(entry.cfg or {}) and not _cached(entry.cfg):
                raise _offline_error(name, entry.cfg)  # without waiting for datasets to say so
            try:
                loaded = manager.load([name])
            except Exception as exc:
                raise _build_error(name, entry, exc) from None
            for task_name, task in loaded["tasks"].items():
                if task_name in origin and origin[task_name] != name:
                    raise EvalError(
                        f"task {task_name} is selected twice (by {origin[task_name]} and {name}); "
                        "list it once"
                    )
                origin[task_name] = name
                _check_not_empty(task_name, task, entry)
                merged["tasks"][task_name] = task
            merged["groups"].update(loaded.get("groups", {}))
            merged["group_map"].update(loaded.get("group_map", {}))
        return merged

    def _broken_definition(self, name: str) -> EvalError | None:
        """The error for a task YAML that mentions `name` but that lm-eval could not index."""
        for path, problem in _broken_yaml(self.folders):
            if name in path.read_text(errors="replace"):
                return EvalError(f"{path}: {problem}; fix it to use task {name}")
        return None

    def _unknown(self, name: str, manager: TaskManager) -> EvalError:
        broken = list(_broken_yaml(self.folders))
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        folders = ", ".join(str(f) for f in self.folders) or "none given"
        note = f" ({broken[0][0]}: {broken[0][1]})" if broken else ""
        return EvalError(
            f"unknown task {name!r}: not in lm-eval's registry, the bundled tasks or the "
            f"include path ({folders}){hint}{note}"
        )


@functools.cache
def _full_manager(folders: tuple[Path, ...]) -> TaskManager:
    """lm-eval's registry plus `folders`; indexing it takes seconds, so once per process."""
    return TaskManager(include_path=[str(f) for f in folders])


def _broken_yaml(folders: Sequence[Path]):
    """(path, problem) for every task YAML under `folders` that lm-eval's index skips."""
    for folder in folders:
        for path in sorted(folder.glob("**/*.yaml")):
            try:
                load_yaml(path, resolve_func=False, recursive=True)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark else ""
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                yield path, f"malformed task YAML{where}: {problem}"
            except Exception as exc:
                yield path, f"unreadable task YAML: {first_line(exc, with_type=True)}"


def _offline() -> bool:
    return any(
        os.environ.get(var, "").lower() in {"1", "true", "yes", "on"} for var in _OFFLINE_VARS
    )


def _is_hub_dataset(cfg: dict[str, Any]) -> bool:
    path = cfg.get("dataset_path")
    return (
        isinstance(path, str)
        and "custom_dataset" not in cfg
        and path not in _LOCAL_BUILDERS
        and not Path(path).expanduser().exists()
    )


def _cached(cfg: dict[str, Any]) -> bool:
    """Whether a Hub dataset has anything in the local caches `datasets` reads offline."""
    import datasets.config
    from huggingface_hub import constants

    repo = cfg["dataset_path"]
    return (Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___")).exists() or (
        Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    ).exists()


def _offline_error(name: str, cfg: dict[str, Any]) -> EvalError:
    dataset, config = cfg["dataset_path"], cfg.get("dataset_name")
    label = f"{dataset} (config {config})" if config else dataset
    args = f"'{dataset}', '{config}'" if config else f"'{dataset}'"
    state = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" if _offline() else "the Hub is unreachable"
    return EvalError(
        f"task {name} needs the dataset {label}, which is not in the local Hugging Face cache "
        f'and {state}: fetch it beforehand on a machine with network (python -c "import '
        f'datasets; datasets.load_dataset({args})") and copy ~/.cache/huggingface here'
    )


def _data_files(cfg: dict[str, Any]) -> list[Path]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = [
            f for value in files.values() for f in (value if isinstance(value, list) else [value])
        ]
    elif isinstance(files, str):
        files = [files]
    return [Path(f) for f in files if isinstance(f, str)]


def _build_error(name: str, entry: Entry, exc: Exception) -> EvalError:
    cfg = entry.cfg or {}
    where = f"task {name} ({entry.yaml_path})" if entry.yaml_path else f"task {name}"
    network = isinstance(exc, ConnectionError | TimeoutError) or "Offline" in type(exc).__name__
    if _is_hub_dataset(cfg) and (_offline() or network):
        return _offline_error(name, cfg)
    if network and (repo := re.search(r"'([\w.-]+/[\w.-]+)'", str(exc))):
        # A member of a group or tag: the message names the repository.
        return _offline_error(name, {"dataset_path": repo[1]})
    files = _data_files(cfg)
    missing = [f for f in files if not f.exists()]
    if isinstance(exc, FileNotFoundError) or missing:
        shown = missing[0] if missing else (exc.filename if isinstance(exc, OSError) else exc)
        return EvalError(f"{where}: data file not found: {shown}; fix dataset_kwargs.data_files")
    if files and all(not f.read_text(errors="replace").strip() for f in files):
        return EvalError(f"{where}: the dataset is empty ({files[0]}); add documents to it")
    return EvalError(f"{where}: cannot build the task: {first_line(exc, with_type=True)}")


def _check_not_empty(name: str, task: Task, entry: Entry) -> None:
    try:
        count = len(task.eval_docs)
    except ValueError:
        raise EvalError(
            f"task {name} ({entry.yaml_path}): no test_split or validation_split to evaluate on; "
            "name one in its YAML"
        ) from None
    if count == 0:
        raise EvalError(
            f"task {name} ({entry.yaml_path}): the dataset is empty; add documents to its "
            "evaluation split"
        )
