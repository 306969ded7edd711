"""The bundled demo tasks: their data stays the demo family's, their splits are disjoint, and the
trained experts each score clearly higher on their own skill than the other expert does."""

from __future__ import annotations

import json

import pytest
import yaml
from build_family import write_task_data
from helpers import assert_all_agree, run_cli

from evomerge.evals.catalog import BUNDLED_TASKS
from evomerge.evals.evaluator import Evaluator
from evomerge.evals.models import load_candidate
from evomerge.evals.spec import FitnessSpec, load_fitness_spec
from evomerge.evals.suite import prepare_suites

pytestmark = pytest.mark.usefixtures("offline_single_thread")
SKILLS = ("skill_a", "skill_b", "combined")
DEMO_TASKS = BUNDLED_TASKS / "demo"
DEMO_SPEC = BUNDLED_TASKS.parent / "specs" / "demo.yaml"


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bundled_data_is_what_the_generator_makes(tmp_path):
    written = write_task_data(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        p.name for p in (DEMO_TASKS / "data").glob("*.jsonl")
    )
    for path in written:
        assert path.read_bytes() == (DEMO_TASKS / "data" / path.name).read_bytes(), path.name


def test_fitness_and_heldout_splits_are_disjoint():
    for skill in (*SKILLS, "mixed"):
        fitness = {r["prompt"] for r in rows(DEMO_TASKS / "data" / f"{skill}_fitness.jsonl")}
        heldout = {r["prompt"] for r in rows(DEMO_TASKS / "data" / f"{skill}_heldout.jsonl")}
        assert fitness and heldout and not fitness & heldout, skill


@pytest.fixture(scope="module")
def demo_scores(demo_family):
    """Fitness and held-out accuracy per model and skill, through lm-eval."""
    spec = load_fitness_spec(DEMO_SPEC)
    suites = prepare_suites(spec)
    scores = {}
    for name in ("base", "expert_a", "expert_b"):
        candidate = load_candidate(demo_family / name, device="cpu")
        evaluator = Evaluator(candidate.model, candidate.tokenizer, suites)
        scores[name] = {
            split: {s.task.removesuffix("_heldout"): s.value for s in evaluator.score(split).scores}
            for split in ("fitness", "heldout")
        }
    return scores


@pytest.mark.slow
def test_each_expert_wins_its_own_skill(demo_scores):
    for split in ("fitness", "heldout"):
        a, b = demo_scores["expert_a"][split], demo_scores["expert_b"][split]
        assert a["demo_skill_a"] >= b["demo_skill_a"] + 0.15, (split, a, b)
        assert b["demo_skill_b"] >= a["demo_skill_b"] + 0.15, (split, a, b)


@pytest.mark.slow
def test_heldout_scores_match_the_family_report(demo_family, demo_scores):
    """The demo family measured its models with its own greedy loop; lm-eval agrees."""
    report = json.loads((demo_family / "skills.json").read_text())["accuracy"]
    for name, by_skill in report.items():
        for skill in SKILLS:
            ours = demo_scores[name]["heldout"][f"demo_{skill}"]
            assert ours == pytest.approx(by_skill[skill], abs=0.02), (name, skill)


@pytest.mark.slow
def test_stderr_without_bootstrap_equals_lm_evals(demo_family, tmp_path):
    """With bootstrap_iters 0 lm-eval reports no stderr; evomerge computes the closed form lm-eval
    uses for mean metrics, per filter, from the values it kept."""
    folder = tmp_path / "two_filters"
    folder.mkdir()
    (folder / "utils.py").write_text((DEMO_TASKS / "utils.py").read_text())
    (folder / "data").mkdir()
    data = DEMO_TASKS / "data" / "combined_fitness.jsonl"
    (folder / "data" / data.name).write_text(data.read_text())
    (folder / "task.yaml").write_text(
        "task: combined_two_filters\n"
        "custom_dataset: !function utils.load_split\n"
        "dataset_kwargs: {data_file: combined_fitness.jsonl}\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_text: prompt\ndoc_to_target: answer\ntarget_delimiter: ''\n"
        "generation_kwargs: {until: ['</s>'], max_gen_toks: 12, do_sample: false}\n"
        "filter_list:\n"
        "  - {name: raw, filter: [{function: take_first}]}\n"
        "  - name: number\n"
        "    filter: [{function: regex, regex_pattern: '(\\d+)$'}, {function: take_first}]\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    candidate = load_candidate(demo_family / "base", device="cpu")
    stderrs = {}
    for iters in (0, 1000):
        spec = FitnessSpec.model_validate(
            {
                "tasks": [
                    {"task": "combined_two_filters", "metric": f"exact_match,{f}", "heldout": None}
                    for f in ("raw", "number")
                ],
                "include_path": [folder],
                "bootstrap_iters": iters,
                "limit": 60,
            }
        )
        result = Evaluator(candidate.model, candidate.tokenizer, prepare_suites(spec)).score()
        stderrs[iters] = [(s.filter, s.value, s.stderr) for s in result.scores]
    assert stderrs[0] == stderrs[1000]
    (_, raw, raw_se), (_, number, number_se) = stderrs[0]
    assert raw < number and raw_se != number_se  # the filters really differ


@pytest.mark.slow
def test_folder_memory_and_lm_eval_run_agree_on_bundled_tasks(
    demo_family, tmp_path, monkeypatch, capsys
):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(demo_family / "base"),
                "models": [
                    {"model": str(demo_family / e), "parameters": {"weight": w, "density": 0.8}}
                    for e, w in (("expert_a", 0.7), ("expert_b", 0.5))
                ],
                "dtype": "float32",
            }
        )
    )
    tasks = ",".join(f"demo_{s}" for s in SKILLS)
    ours = assert_all_agree(recipe, tasks, BUNDLED_TASKS, 16, 40, tmp_path, monkeypatch, capsys)
    assert all(0 < s["value"] < 1 and s["stderr"] > 0 for s in ours["scores"])  # not trivial


@pytest.mark.slow
def test_cli_scores_both_splits_of_a_fitness_spec(demo_family, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores.json"
    args = ["eval", str(demo_family / "expert_b"), "--fitness", str(DEMO_SPEC), "--limit", "20"]
    code, stdout, _ = run_cli([*args, "--device", "cpu", "--output", str(out)], monkeypatch, capsys)
    assert code in (0, None)
    assert "fitness (weighted)" in stdout and "heldout (weighted)" in stdout
    data = json.loads(out.read_text())
    assert data["model"] == f"dir:{demo_family / 'expert_b'}"
    for split in ("fitness", "heldout"):
        scores = data[split]["scores"]
        assert [s["n"] for s in scores] == [20, 20, 20]
        assert data[split]["fitness"] == pytest.approx(sum(s["value"] for s in scores) / 3)
        assert data[split]["settings"]["batch_size"] == 100  # the spec's
        assert data[split]["settings"]["bootstrap_iters"] == 0
        assert all(g["max_gen_toks"] == 12 for g in data[split]["generation"].values())


def test_demo_spec_is_valid():
    spec = load_fitness_spec(DEMO_SPEC)
    assert isinstance(spec, FitnessSpec)
    assert [e.task for e in spec.entries("fitness")] == [f"demo_{s}" for s in SKILLS]
    assert [e.task for e in spec.entries("heldout")] == [f"demo_{s}_heldout" for s in SKILLS]


@pytest.mark.slow
def test_demo_scores_do_not_depend_on_the_cpus_vector_width(demo_family, tmp_path):
    """The shipped family scores the same with torch's kernels forced to no vector code as with
    the machine's own (training did differ: see demo/README.md), so the README's numbers hold on
    other CPUs."""
    import os
    import subprocess
    import sys

    outputs = {}
    for capability in (None, "default"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        out = tmp_path / f"{capability or 'native'}.json"
        args = ["eval", str(demo_family / "expert_b"), "--tasks", "demo_mixed_heldout"]
        args += ["--device", "cpu", "--batch-size", "100", "--output", str(out)]
        done = subprocess.run(
            [sys.executable, "-m", "evomerge", *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[capability] = [
            (s["task"], s["value"]) for s in json.loads(out.read_text())["tasks"]["scores"]
        ]
    assert outputs[None] == outputs["default"] and outputs[None][0][1] == pytest.approx(0.76)
