"""Helpers shared by test modules (no tests here): running the CLI in-process, scoring through
`evomerge eval` and plain `lm-eval run`, small search recipes over the demo family, reading a
study, and loading a folder's weights."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import cli
from evomerge.evals.results import EvalResult, Score, weighted_mean
from evomerge.search.config import load_search_recipe
from evomerge.search.loop import Search


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder`."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def sample_outputs(samples: list[dict], metric: str = "exact_match") -> list[tuple]:
    """(document, first filtered response, metric) per sample, sorted by document."""
    return sorted((s["doc_id"], s["filtered_resps"][0], s[metric]) for s in samples)



def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def error_line(stderr: str) -> str:
    """The CLI's error: one line, the last on stderr (progress bars may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.endswith(errors[0] + "\n"), stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def cli_eval(model: Path, out: Path, tasks: str, include: Path, monkeypatch, capsys, *extra):
    """`evomerge eval` through main(); returns its JSON."""
    args = ["eval", str(model), "--tasks", tasks, "--include-path", str(include), "--device", "cpu"]
    args += ["--output", str(out), "--log-samples", *extra]
    code, stdout, _ = run_cli(args, monkeypatch, capsys)
    assert code in (0, None)
    assert "exact_match" in stdout and "±" in stdout
    return json.loads(out.read_text())


def lm_eval_run(model: Path, tasks: str, include: Path, out: Path, *extra: str) -> dict:
    """Plain `lm-eval run` in a subprocess; returns its results JSON with `samples` added."""
    command = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={model}", "--device", "cpu", "--tasks", tasks,
        "--include_path", str(include), "--output_path", str(out), "--log_samples", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
    results = json.loads(next(out.glob("**/results_*.json")).read_text())
    results["samples"] = {
        task: [json.loads(line) for line in next(out.glob(f"**/samples_{task}_*.jsonl")).open()]
        for task in results["results"]
    }
    return results


def assert_all_agree(
    recipe: Path,
    tasks: str,
    include: Path,
    batch_size: int,
    limit: int,
    tmp_path,
    monkeypatch,
    capsys,
) -> dict:
    """Merge `recipe` to a folder; score the folder and the recipe in memory with `evomerge eval`,
    and the folder with `lm-eval run`: the same metrics, stderrs and per-document outputs."""
    merged = tmp_path / "merged"
    code, _, _ = run_cli(
        ["merge", str(recipe), str(merged), "--device", "cpu"], monkeypatch, capsys
    )
    assert code in (0, None)
    ours_args = ["--batch-size", str(batch_size), "--limit", str(limit)]
    from_dir = cli_eval(
        merged, tmp_path / "dir.json", tasks, include, monkeypatch, capsys, *ours_args
    )
    in_memory = cli_eval(
        recipe, tmp_path / "mem.json", tasks, include, monkeypatch, capsys, *ours_args
    )
    assert from_dir["model"].startswith("dir:") and in_memory["model"].startswith("recipe:")
    theirs_args = ["--batch_size", str(batch_size), "--limit", str(limit)]
    reference = lm_eval_run(merged, tasks, include, tmp_path / "lm_eval", *theirs_args)
    ours = from_dir["tasks"]
    assert ours["scores"] == in_memory["tasks"]["scores"]
    assert {s["task"] for s in ours["scores"]} == set(tasks.split(","))
    for score in ours["scores"]:
        row = reference["results"][score["task"]]
        key = f"{score['metric']},{score['filter']}"
        assert (score["value"], score["stderr"]) == (row[key], row[key.replace(",", "_stderr,")])
        assert score["n"] == reference["n-samples"][score["task"]]["effective"]
        outputs = sample_outputs(ours["samples"][score["task"]])
        assert outputs == sample_outputs(in_memory["tasks"]["samples"][score["task"]])
        assert outputs == sample_outputs(reference["samples"][score["task"]])
    return ours



def write_recipe(path: Path, family: Path, **overrides) -> Path:
    """A small search recipe over the demo family (fitness on 60 rows: fast)."""
    recipe = {
        "merge": {
            "merge_method": "dare_ties",
            "base_model": str(family / "base"),
            "models": [{"model": str(family / "expert_a")}, {"model": str(family / "expert_b")}],
            "dtype": "float32",
        },
        "space": {
            "parameters": {
                "weight": {"low": 0, "high": 1, "init": 0.5},
                "density": {"low": 0.1, "high": 1, "init": 0.5},
            },
            "layer_granularity": 2,
        },
        "fitness": {
            "tasks": [
                {
                    "task": "demo_combined",
                    "metric": "exact_match",
                    "rows": "0:60",
                    "heldout": {"task": "demo_combined_heldout", "rows": "0:60"},
                }
            ],
            "batch_size": 60,
        },
        "budget": {"evaluations": 16},
        "optimizer": {"name": "CMA", "population": 4},
        "seed": 3,
        "device": "cpu",
    }
    for key, value in overrides.items():
        recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


class HashExecutor:
    """A stand-in executor for loop, journal, optimizer and fitness-mode contracts: each
    candidate's value on each row of each fitness entry is a hash of the candidate and the row
    (the same candidate always scores the same), so a search runs in milliseconds with no model.
    `tasks` are the fitness entries' names, each with `rows` rows (0, 1, ...); candidates are
    scored through their tickets, as the real executors score them; each takes at least
    `seconds` (for wall-clock budgets)."""

    def __init__(self, tasks: list[str], seconds: float = 0.0, rows: int = 60):
        self.tasks = tasks
        self.seconds = seconds
        self.rows = rows
        self.evaluated = 0

    def _result(self, what: object, split: str, rows: dict | None = None) -> EvalResult:
        scores, values = [], {}
        for task in self.tasks:
            ids = rows[task] if rows is not None else range(self.rows)
            values[task] = [
                int.from_bytes(hashlib.sha256(f"{split} {task} {i} {what!r}".encode()).digest()[:4])
                / 2**32
                for i in ids
            ]
            value = sum(values[task]) / len(values[task])
            scores.append(Score(task, "exact_match", "none", value, 0.01, len(ids), weight=1.0))
        fitness, stderr = weighted_mean(scores)
        return EvalResult(split, scores, fitness, stderr, settings={"decoding": "hash"},
                          rows=values)  # fmt: skip

    def evaluate(self, candidates, tickets):
        tickets = iter(tickets)
        for candidate in candidates:
            yield self.run(candidate, next(tickets))

    def run(self, candidate, ticket):
        time.sleep(self.seconds)
        self.evaluated += 1
        return ticket.run(lambda rows: self._result(candidate, "fitness", rows))

    def score(self, candidate, split):
        return self._result(candidate, split)

    def score_source(self, model):
        return {split: self._result(model, split) for split in ("fitness", "heldout")}

    def score_recipe(self, recipe, splits):
        return {split: self._result(recipe, split) for split in splits}

    def close(self):
        pass


def trials_of(out: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{out / 'study.db'}")
    return sorted(study.get_trials(), key=lambda t: t.number)


def content(trial: optuna.trial.FrozenTrial) -> tuple:
    attrs = trial.user_attrs
    return (
        trial.number,
        trial.state.name,
        tuple(sorted(trial.params.items())),
        tuple(trial.values or ()),
        tuple(sorted(attrs.get("scores", {}).items())),
        attrs.get("generation"),
        attrs.get("recipe"),
    )


def run(recipe_path: Path, out: Path, **kwargs):
    search = Search.prepare(load_search_recipe(recipe_path), out)
    return search.run(echo=lambda _: None, progress=False, **kwargs)


def search_on(server_url: str, study: str, recipe: Path, out: Path, **kwargs):
    """A search of `recipe` whose study is `study` on the database at `server_url`."""
    search = Search.prepare(load_search_recipe(recipe), out, storage=server_url)
    search.recipe = search.recipe.model_copy(update={"study_name": study})
    return search.run(echo=lambda _: None, progress=False, write_model=False, **kwargs)


# The resume contracts differ by backend: Nevergrad replays its tells in one process, Optuna
# samplers read the study; one optimizer of each.
EACH_BACKEND = pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "CMA", "population": 4},
        {"backend": "optuna", "name": "TPESampler", "population": 4},
    ],
    ids=["nevergrad-cma", "optuna-tpe"],
)


def mergekit_offline(recipe: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`mergekit-yaml RECIPE OUT` with no network: the recipe must name only local models."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tool = Path(sys.executable).with_name("mergekit-yaml")
    return subprocess.run(
        [str(tool), str(recipe), str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )



def _default_sigint() -> None:
    """A test run in the background (nohup, `cmd &` in a script) ignores SIGINT, and so would
    the CLI it starts: Python installs its Ctrl-C handler only where SIGINT is not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stalled_cli(argv: list[str], marker: Path, release: Path, env: dict | None = None):
    """`evomerge ARGV` in a subprocess whose first merged tensor creates `marker`, then waits
    (up to 60 s) for a file `release`; returned once the marker exists, so a signal sent now
    lands mid-merge, whatever the machine's speed."""
    hooked = (
        "import os, sys, time\n"
        "import evomerge.merge.materialize as m\n"
        "compute = m.compute_task\n"
        "def stalled(*a, **k):\n"
        f"    open({str(marker)!r}, 'a').close()\n"
        "    deadline = time.monotonic() + 60\n"
        f"    while not os.path.exists({str(release)!r}) and time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    return compute(*a, **k)\n"
        "m.compute_task = stalled\n"
        f"sys.argv = ['evomerge', *{argv!r}]\n"
        "from evomerge.cli import main\nmain()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", hooked], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=_default_sigint)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not marker.exists() and process.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1]
    return process
