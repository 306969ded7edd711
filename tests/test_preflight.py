"""One preflight (`search.loop.preflight`) for a run and a dry run: whatever `evomerge search`
refuses before loading anything, `--dry-run` refuses with the same line, and neither writes."""

from __future__ import annotations

import pytest
from helpers import error_line, run_cli, write_recipe

RACING = {"type": "racing", "chunk": 20}
FITNESS = {
    "tasks": [{"task": "demo_combined", "metric": "exact_match", "rows": "0:60",
               "heldout": {"task": "demo_combined_heldout", "rows": "0:60"}}],
}  # fmt: skip


def fitness(**mode):
    return {**FITNESS, "mode": mode}


REFUSALS = {
    "racing on ray": ({"fitness": fitness(**RACING), "executor": "ray"}, "run it with executor"),
    "data flow on ray": ({"space": {"type": "dfs"}, "executor": "ray", "baselines": []},
                         "data-flow searches run with the serial executor"),
    "unknown pruner": ({"fitness": fitness(**RACING, pruner="Median")}, "not an Optuna pruner"),
    "unknown optimizer": ({"optimizer": {"name": "CMAES"}}, "is not a Nevergrad optimizer"),
    "unknown option": ({"optimizer": {"name": "CMA", "options": {"popsiz": 4}}},
                       "did you mean popsize"),
    "cycle_qd, one task": ({"optimizer": {"name": "cycle_qd"}}, "at least two fitness tasks"),
    "niches and racing": ({"optimizer": {"name": "natural_niches"}, "fitness": fitness(**RACING)},
                          "racing's early stops"),
    "niches and irt": ({"optimizer": {"name": "natural_niches"},
                        "fitness": fitness(type="irt", anchors=10)}, "use mode full"),
    "strategy, data flow": ({"optimizer": {"name": "natural_niches"}, "space": {"type": "dfs"},
                             "baselines": []}, "breeds parameter-space genomes"),
    "hand baseline, data flow": ({"space": {"type": "dfs"}, "baselines": ["ties"]},
                                 "baselines: ties needs a parameter-space search"),
    "missing model": ({"merge": {"base_model": "./no/such/model", "models": [
        {"model": "./no/such/model"}]}}, "no such directory"),
    "filter in no tensor": ({"space": {"parameters": {"weight": {}}, "filters": ["attn_q"]}},
                            "'attn_q' is in no tensor name"),
}  # fmt: skip


@pytest.mark.parametrize("change, message", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_dry_run_refuses_what_a_run_refuses(
    change, message, demo_family, tmp_path, monkeypatch, capsys
):
    recipe = write_recipe(tmp_path / "r.yaml", demo_family, **change)
    out = tmp_path / "out"
    lines = []
    for extra in (["--dry-run"], []):
        code, _, err = run_cli(["search", str(recipe), "--out", str(out), *extra],
                               monkeypatch, capsys)  # fmt: skip
        assert code == 2, err
        lines.append(error_line(err))
    assert lines[0] == lines[1] and message in lines[0]
    assert not out.exists()
