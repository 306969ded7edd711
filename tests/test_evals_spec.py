"""The fitness spec: parsing, split discipline and its one-line errors (no model involved)."""

from __future__ import annotations

import pytest

from evomerge.evals.errors import EvalError
from evomerge.evals.spec import load_fitness_spec, parse_fitness_spec
from evomerge.merge.errors import MergeError


def spec(**extra):
    data = {
        "tasks": [
            {"task": "a", "metric": "exact_match", "weight": 2, "heldout": "a_held"},
            {"task": "b", "metric": "acc,none", "heldout": None},
        ]
    }
    return parse_fitness_spec({**data, **extra})


def test_entries_per_split_and_generation_budget():
    parsed = spec(generation={"max_gen_toks": 12, "until": ["\n"]}, limit=50)
    assert [(e.task, e.metric, e.weight) for e in parsed.entries("fitness")] == [
        ("a", "exact_match", 2.0),
        ("b", "acc,none", 1.0),
    ]
    # The held-out entry inherits the metric and weight; b opted out of a held-out split.
    assert [(e.task, e.metric, e.weight) for e in parsed.entries("heldout")] == [
        ("a_held", "exact_match", 2.0)
    ]
    assert parsed.generation.gen_kwargs() == {
        "do_sample": False,
        "temperature": 0.0,
        "max_gen_toks": 12,
        "until": ["\n"],
    }
    assert parsed.settings().limit == 50
    assert parsed.bootstrap_iters == 0  # off by default in searches


def test_sakana_shape_rows_on_one_task():
    parsed = parse_fitness_spec(
        {
            "tasks": [
                {
                    "task": "gsm8k",
                    "metric": "exact_match,strict-match",
                    "rows": "250:1318",
                    "heldout": {"task": "gsm8k", "rows": [0, 250]},
                }
            ]
        }
    )
    assert parsed.tasks[0].rows == (250, 1318)
    assert parsed.entries("heldout")[0].rows == (0, 250)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tasks": [{"task": "a", "metric": "m"}]}, "a has no held-out task: add heldout:"),
        ({"tasks": []}, "tasks: List should have at least 1 item"),
        ({"tasks": [{"task": "a", "metric": "m", "heldout": None, "wieght": 1}]}, "wieght"),
        ({"tasks": [{"task": "a", "metric": "m", "weight": 0, "heldout": None}]}, "weight"),
        (
            {"tasks": [{"task": "a", "metric": "m", "heldout": "a"}]},
            "the held-out split of a overlaps its fitness rows",
        ),
        (
            {
                "tasks": [
                    {
                        "task": "a",
                        "metric": "m",
                        "rows": "0:100",
                        "heldout": {"task": "a", "rows": "50:150"},
                    }
                ]
            },
            "overlaps its fitness rows",
        ),
        (
            {
                "tasks": [
                    {"task": "a", "metric": "m", "heldout": "b"},
                    {"task": "b", "metric": "m", "heldout": None},
                ]
            },
            "held-out task b is also optimized",
        ),
        ({"tasks": [{"task": "a", "metric": "m", "rows": "5-9", "heldout": None}]}, "START:END"),
        (
            {"tasks": [{"task": "a", "metric": "m", "rows": [9, 5], "heldout": None}]},
            "0 <= start < end",
        ),
        (
            {"tasks": [{"task": "a", "metric": "m", "heldout": None}], "limit": 2.5},
            "fractional limit",
        ),
        ({"tasks": [{"task": "a", "metric": "m", "heldout": None}], "batch_size": 0}, "batch_size"),
        ("just text", "expected a mapping"),
    ],
)
def test_spec_errors_are_one_line(data, message):
    with pytest.raises(EvalError) as info:
        parse_fitness_spec(data, origin="spec.yaml")
    text = str(info.value)
    assert message in text
    assert text.startswith("spec.yaml")
    assert "\n" not in text
    assert isinstance(info.value, MergeError)  # the CLI turns it into exit code 2


def test_load_from_search_recipe_block_resolves_include_path(tmp_path):
    (tmp_path / "my_tasks").mkdir()
    path = tmp_path / "search.yaml"
    path.write_text(
        "merge: {merge_method: linear}\n"
        "fitness:\n"
        "  include_path: [my_tasks]\n"
        "  tasks:\n"
        "    - {task: t, metric: exact_match, heldout: t_held}\n"
    )
    loaded = load_fitness_spec(path)
    assert loaded.include_path == [tmp_path / "my_tasks"]
    assert loaded.tasks[0].heldout.task == "t_held"


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(EvalError, match=r"nope\.yaml: cannot read the fitness spec"):
        load_fitness_spec(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [\n")
    with pytest.raises(EvalError, match=r"bad.yaml: malformed YAML at line \d"):
        load_fitness_spec(bad)
