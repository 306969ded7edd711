"""`evomerge search recipes/evollm-jp-ps.yaml --dry-run`: Sakana's EvoLLM-JP parameter-space
search validates and is estimated offline, with an empty home (no Hugging Face cache), and its
fitness task folder holds a task lm-eval finds, prompts in Japanese and scores by the last number.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.evals.catalog import TaskCatalog

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/evollm-jp-ps.yaml"
TASKS = REPO / "recipes" / "tasks" / "gsm8k_ja"
DATASET = "SakanaAI/gsm8k-ja-test_250-1319"
MODELS = ("shisa-gamma-7b-v1", "WizardMath-7B-V1.1", "Abel-7B-002")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _bare_env(home: Path) -> dict[str, str]:
    """This environment offline, with caches under an empty home: nothing cached can help."""
    cache_vars = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cache_vars)}
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
def test_dry_run_offline_with_an_empty_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge", "search", RECIPE, "--dry-run"],
        cwd=REPO,
        env=_bare_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    lines = out.splitlines()
    assert lines[0] == f"{RECIPE}: valid"
    assert "space: 6 genes" in lines
    genes = [line.split() for line in lines if line.startswith(("  density.", "  weight."))]
    assert [g[0] for g in genes] == [f"{p}.{m}" for p in ("density", "weight") for m in MODELS]
    assert all(g[1:] == ["0", "1", "0.5", "0.1667"] for g in genes), genes
    assert "optimizer: nevergrad CMA, population 9, 112 generations (the last of 1)" in lines
    assert "budget: 1000 evaluations" in lines
    assert "fitness: gsm8k_ja rows 0:1069 (exact_match)" in lines
    assert "heldout: mgsm_native_cot_ja rows 0:250 (exact_match,flexible-extract)" in lines
    assert any(line.startswith("cost: one evaluation = 1,069 documents") for line in lines)
    assert re.search(
        r"^cost: 1000 evaluations = at most [\d.,]+[MB] generated tokens, about [\d,.]+ GPU-hours$",
        out,
        re.MULTILINE,
    ), out
    assert any(line.startswith("assumed: ") for line in lines)
    assert lines[-1] == "nothing was downloaded or loaded"
    fetched = [p for p in home.rglob("*") if p.name.startswith(("models--", "datasets--"))]
    assert not fetched


def test_gsm8k_ja_task_is_found_prompts_in_japanese_and_scores_the_last_number(tmp_path):
    TaskCatalog([TASKS]).check(["gsm8k_ja"])
    config = yaml.safe_load((REPO / RECIPE).read_text())
    assert (REPO / "recipes" / config["fitness"]["include_path"][0]).resolve() == TASKS
    # The same task on two local rows instead of the Hub dataset: prompt, target and scoring.
    folder = tmp_path / "gsm8k_ja"
    shutil.copytree(TASKS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    data = tmp_path / "rows.jsonl"
    rows = [
        {"question": "ジャネットのアヒルは1日に16個の卵を産みます。", "answer_number": 18},
        {"question": "カップには9,300枚の硬貨が入っています。", "answer_number": 1000},
    ]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    task_yaml = folder / "gsm8k_ja.yaml"
    text = task_yaml.read_text()
    assert f"dataset_path: {DATASET}\n" in text
    local = f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: '{data}'}}}}\n"
    task_yaml.write_text(text.replace(f"dataset_path: {DATASET}\n", local))
    task = TaskCatalog([folder]).load(["gsm8k_ja"])["tasks"]["gsm8k_ja"]
    first, second = list(task.eval_docs)
    assert task.doc_to_text(first) == f"問題： {rows[0]['question']}\nステップごとの答え:"
    assert task.config.generation_kwargs["do_sample"] is False
    assert task.config.num_fewshot == 0

    def score(doc, response):
        return task.process_results(doc, [response])["exact_match"]

    assert score(first, "16-3-4=9個残ります。9*2=18ドルです。答えは18です。") == 1.0
    assert score(first, "答えは18ドルです。ただし2日なら36ドルです。") == 0.0  # the last number
    assert score(second, "合計は1,000ドルです。") == 1.0
    assert score(second, "合計は100ドルです。") == 0.0
