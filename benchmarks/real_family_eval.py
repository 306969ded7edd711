"""The real test family on CPU: `evomerge eval` with its default batch size (auto) against
`lm-eval run --batch_size 16`, what the old probe at the model's maximum length would cost, and
a search candidate's materialization against one copy pass over the same bytes.

    python benchmarks/real_family_eval.py        # needs the family: see tests/real_family.py

Prints wall times of each command (process start and model load included) on the capitals task
(recipes/tasks/capitals, 100 questions x 4 choices), and one forward pass at 1 x 8,192 tokens:
the old probe ran five such passes for every batch size it tried, from 64 down. Then the
in-place materialization of recipes/smol-ps.yaml's merge (3 sources, task arithmetic, bf16)
against `copy_` of every weight from a resident copy (the floor for writing new weights).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "demo")]
from real_family import real_family  # noqa: E402

TASKS = REPO / "recipes" / "tasks" / "capitals"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - started


def main() -> None:
    base = real_family().base
    with tempfile.TemporaryDirectory() as tmp:
        ours = timed([
            "evomerge", "eval", str(base), "--tasks", "capitals", "--include-path", str(TASKS),
            "--device", "cpu", "--output", f"{tmp}/ours.json",
        ])  # fmt: skip
        theirs = timed([
            sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={base},dtype=bfloat16", "--device", "cpu",
            "--tasks", "capitals", "--include_path", str(TASKS), "--batch_size", "16",
            "--output_path", f"{tmp}/lm_eval",
        ])  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    ids = torch.ones((1, model.config.max_position_embeddings), dtype=torch.long)
    started = time.perf_counter()
    with torch.no_grad():
        torch.log_softmax(model(ids).logits, dim=-1)
    forward = time.perf_counter() - started
    print(f"torch threads {torch.get_num_threads()}, model {base}")
    print("| command | wall s |")
    print("| --- | --- |")
    print(f"| evomerge eval (batch size auto) | {ours:.1f} |")
    print(f"| lm-eval run --batch_size 16 | {theirs:.1f} |")
    print(f"| one forward pass at 1 x {ids.shape[1]} tokens (old probe: 5 per size tried) | "
          f"{forward:.1f} |")  # fmt: skip
    materialize, copy = materialize_vs_copy(base.parent)
    print(f"materialize in place {materialize:.3f} s, copy pass {copy:.3f} s "
          f"({materialize / copy:.1f}x), median of 5")  # fmt: skip


def materialize_vs_copy(family: Path) -> tuple[float, float]:
    import statistics

    from evomerge.merge.recipe import parse_recipe
    from evomerge.merge.resident import ResidentMerger

    recipe = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(family / "base"),
        "models": [{"model": str(family / name), "parameters": {"weight": 0.5}}
                   for name in ("expert_a", "expert_b")],
        "dtype": "bfloat16",
    })  # fmt: skip
    merger = ResidentMerger(recipe, device="cpu")
    model = merger.build_model()
    sources = {name: p.detach().clone() for name, p in model.named_parameters()}
    merges, copies = [], []
    for _ in range(5):
        started = time.perf_counter()
        merger.materialize(model, recipe)
        merges.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(sources[name])
        copies.append(time.perf_counter() - started)
    return statistics.median(merges), statistics.median(copies)


if __name__ == "__main__":
    main()
