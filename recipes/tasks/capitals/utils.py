"""Loads capitals.jsonl beside this file, whatever the working directory (lm-eval loads this
module by path)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "capitals.jsonl"


def load_split(**_: object) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
