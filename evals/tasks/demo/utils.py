"""Data loading and scoring for the demo family's tasks (lm-eval loads this file by path)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from evomerge.evals.extract import answer_matches

DATA = Path(__file__).resolve().parent / "data"


def load_split(data_file: str, **_: object) -> datasets.DatasetDict:
    """The task's jsonl file beside this module, whatever the working directory."""
    lines = (DATA / data_file).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Right when the last number of the generation equals the answer."""
    return {"exact_match": float(answer_matches(results[0], doc["answer"]))}
