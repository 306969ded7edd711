"""The bundled demo tasks' data: the demo family's evaluation items, committed as jsonl.

The items come from `evomerge.demo_family.make_eval_splits`, which depends on the seed only (no
training), so the files are small, reproducible and present in a clean checkout; a test checks
that they still equal what the generator makes. Regenerate them with
`python -m evomerge.evals.demo_data` after changing the generator.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.evals.catalog import BUNDLED_TASKS

DEMO_TASKS = BUNDLED_TASKS / "demo"
DEMO_SPEC = Path(__file__).resolve().parent / "specs" / "demo.yaml"


def write_demo_data(folder: Path = DEMO_TASKS / "data", seed: int = 0) -> list[Path]:
    """Write `{task}_{split}.jsonl` for every demo task and split; returns the files."""
    from evomerge import demo_family

    folder.mkdir(parents=True, exist_ok=True)
    splits = demo_family.make_eval_splits(seed, demo_family.Recipe().eval_items)
    written = []
    for task, by_split in splits.items():
        for split, items in by_split.items():
            path = folder / f"{task}_{split}.jsonl"
            demo_family._write_jsonl(path, items)  # the family's own format, byte for byte
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write_demo_data():
        print(f"wrote {path}")
