"""Scoring with lm-eval on tiny untrained models: in-memory reuse, the greedy fast path, parity
with `lm-eval run`, and the one-line errors for bad tasks, metrics, data and offline datasets."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
import yaml
from families import build_tiny_family
from helpers import assert_all_agree, error_line, run_cli
from lm_eval.api.instance import Instance

from evomerge.evals.catalog import TaskCatalog
from evomerge.evals.errors import EvalError
from evomerge.evals.evaluator import Evaluator
from evomerge.evals.greedy import greedy_refusal
from evomerge.evals.lm import ResidentLM
from evomerge.evals.models import load_candidate
from evomerge.evals.spec import parse_fitness_spec
from evomerge.evals.suite import prepare_suites, suite_from_names
from evomerge.merge.recipe import parse_recipe
from evomerge.merge.resident import ResidentMerger

pytestmark = pytest.mark.usefixtures("offline_single_thread")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("family"), arch="llama", seed=0)


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def write_task(folder: Path, name: str, rows: list[dict], **overrides) -> Path:
    """A generate_until task over local jsonl, the shape of a user's own task folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
        **overrides,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "tiny_add", arithmetic_rows(24, seed=1))
    write_task(folder, "tiny_add_heldout", arithmetic_rows(12, seed=2))
    return folder


def ties_recipe(family, weight: float) -> dict:
    """TIES of the two experts weighted `weight` and `1 - weight`."""
    return {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [
            {"model": str(e), "parameters": {"weight": w, "density": 0.7}}
            for e, w in zip(family.experts, (weight, 1 - weight), strict=True)
        ],
        "dtype": "float32",
    }


def spec_for(task_dir: Path, **extra):
    return parse_fitness_spec(
        {
            "tasks": [{"task": "tiny_add", "metric": "exact_match", "heldout": "tiny_add_heldout"}],
            "include_path": [str(task_dir)],
            "batch_size": 5,
            **extra,
        }
    )


def responses(result) -> dict[str, list[str]]:
    return {
        task: [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in result.samples.items()
    }


# ---------------------------------------------------------------------------------------------
# One model object, many candidates


def test_resident_model_rescored_after_new_weights(family, task_dir):
    suites = prepare_suites(spec_for(task_dir))
    merger = ResidentMerger(parse_recipe(ties_recipe(family, 0.3)), device="cpu")
    model = merger.build_model()
    evaluator = Evaluator(model, merger.tokenizer(), suites, log_samples=True)
    task = suites["fitness"].tasks["tiny_add"]
    builds = []
    original = task.build_all_requests
    task.build_all_requests = lambda **kw: (builds.append(1), original(**kw))[1]

    first = evaluator.score()
    merger.materialize(model, parse_recipe(ties_recipe(family, 0.8)))
    second = evaluator.score()
    merger.materialize(model, parse_recipe(ties_recipe(family, 0.3)))
    third = evaluator.score()

    assert len(builds) == 3 and evaluator.lm._batches  # called per run, tokenized once
    assert responses(first) == responses(third)  # no state leaks from one candidate to the next
    assert responses(first) != responses(second)  # ... and new weights really are scored
    # A fresh evaluator on the 0.8 merge agrees with the reused one.
    fresh_merger = ResidentMerger(parse_recipe(ties_recipe(family, 0.8)), device="cpu")
    fresh = Evaluator(
        fresh_merger.build_model(),
        fresh_merger.tokenizer(),
        prepare_suites(spec_for(task_dir)),
        log_samples=True,
    )
    assert responses(fresh.score()) == responses(second)

    assert [s.n for s in first.scores] == [24]
    assert first.settings["bootstrap_iters"] == 0
    assert first.generation["tiny_add"] == {
        "until": ["\n", "."],
        "do_sample": False,
        "temperature": 0.0,
        "max_gen_toks": 6,
    }
    assert 0 < first.forward_seconds < first.seconds
    held = evaluator.score("heldout")
    assert held.split == "heldout" and [s.n for s in held.scores] == [12]


def test_rows_limit_and_stderr(family, task_dir):
    spec = parse_fitness_spec(
        {
            "tasks": [
                {
                    "task": "tiny_add",
                    "metric": "exact_match",
                    "rows": "4:20",
                    "heldout": {"task": "tiny_add", "rows": "0:4"},
                }
            ],
            "include_path": [str(task_dir)],
            "limit": 10,
        }
    )
    suites = prepare_suites(spec)
    candidate = load_candidate(family.experts[0], device="cpu")
    evaluator = Evaluator(candidate.model, candidate.tokenizer, suites, log_samples=True)
    fit, held = evaluator.score("fitness"), evaluator.score("heldout")
    assert [s["doc_id"] for s in fit.samples["tiny_add"]] == list(range(4, 14))
    assert [s["doc_id"] for s in held.samples["tiny_add"]] == [0, 1, 2, 3]
    assert fit.settings["rows"] == {"tiny_add": [4, 14]}
    # Answers of an untrained model are wrong, so the mean is 0 and so is its stderr.
    assert fit.scores[0].value == 0.0 and fit.scores[0].stderr == 0.0
    assert fit.fitness == 0.0 and fit.vector == [0.0]


# ---------------------------------------------------------------------------------------------
# The greedy fast path picks the tokens model.generate picks


def generation_requests(stops: list[str], count: int, seed: int) -> list[Instance]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = "".join(rng.choice("0123456789+=abc ") for _ in range(rng.randint(1, 14)))
        kwargs = {"until": list(stops), "max_gen_toks": rng.choice([1, 5, 12]), "do_sample": False}
        requests.append(Instance("generate_until", {}, (prompt, kwargs), i))
    return requests


@pytest.mark.parametrize("stops", [["\n"], ["z", "."], ["zz", "7", ","]])
def test_greedy_fast_path_matches_generate(family, stops):
    for folder, batch_size in ((family.base, 7), (family.experts[0], 1), (family.experts[1], 16)):
        candidate = load_candidate(folder, device="cpu")
        lm = ResidentLM(candidate.model, candidate.tokenizer, batch_size=batch_size)
        lm.quiet = True
        requests = generation_requests(stops, 30, seed=len(stops))
        fast = lm.generate_until(requests)
        lm.fast_greedy = False
        assert fast == lm.generate_until(requests)
        assert any(fast) and len(set(fast)) > 3  # the outputs are not all alike or empty


def test_the_fast_path_engages_on_current_transformers_and_says_when_it_does_not(family):
    """transformers 5.24 renamed forward()'s `past_key_values` to `cache`; the fast path must
    follow the name, and a fall-back to generate() is counted with its reason, not silent."""
    candidate = load_candidate(family.base, device="cpu")
    lm = ResidentLM(candidate.model, candidate.tokenizer, batch_size=8)
    lm.quiet = True
    requests = generation_requests(["."], 16, seed=4)
    assert greedy_refusal(candidate.model, candidate.tokenizer, ["."], {"do_sample": False}) is None
    lm.generate_until(requests)
    assert lm.greedy_batches > 0 and lm.generate_batches == 0
    candidate.model.generation_config.repetition_penalty = 1.3  # changes greedy decoding
    lm.generate_until(requests)
    assert lm.generate_batches > 0
    assert lm.greedy_refusal == "generation config sets ['repetition_penalty']"


def test_greedy_fast_path_pads_after_end_of_sequence(family):
    candidate = load_candidate(family.base, device="cpu")
    # Make a frequent character an end-of-sequence token too, so sequences end mid-batch.
    candidate.model.generation_config.eos_token_id = [
        2,
        candidate.tokenizer.convert_tokens_to_ids("z"),
    ]
    lm = ResidentLM(candidate.model, candidate.tokenizer, batch_size=8)
    lm.quiet = True
    requests = generation_requests(["."], 24, seed=5)
    fast = lm.generate_until(requests)
    lm.fast_greedy = False
    assert fast == lm.generate_until(requests)


# ---------------------------------------------------------------------------------------------
# evomerge eval: a folder, the same weights in memory, and plain `lm-eval run` agree


@pytest.mark.slow
def test_folder_memory_and_lm_eval_run_agree(family, task_dir, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump(ties_recipe(family, 0.6)))
    assert_all_agree(recipe, "tiny_add", task_dir, 4, 24, tmp_path, monkeypatch, capsys)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2, before any model is loaded


def test_unknown_task_suggests_close_names(task_dir):
    catalog = TaskCatalog([task_dir])
    with pytest.raises(EvalError, match=r"unknown task 'tiny_ad'.*did you mean tiny_add"):
        catalog.load(["tiny_ad"])


def test_broken_yaml_is_named(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "bad.yaml").write_text("task: bad_task\ndataset_path: json\n  oops: [\n")
    with pytest.raises(
        EvalError, match=r"bad.yaml: malformed task YAML at line \d.*fix it to use task bad_task"
    ):
        TaskCatalog([folder]).load(["bad_task"])


def test_metric_the_task_does_not_produce(task_dir):
    spec = parse_fitness_spec(
        {
            "tasks": [{"task": "tiny_add", "metric": "acc", "heldout": None}],
            "include_path": [str(task_dir)],
        }
    )
    with pytest.raises(
        EvalError, match=r"task tiny_add does not produce metric 'acc'; it produces exact_match"
    ):
        prepare_suites(spec)
    spec = parse_fitness_spec(
        {
            "tasks": [{"task": "tiny_add", "metric": "exact_match,strict", "heldout": None}],
            "include_path": [str(task_dir)],
        }
    )
    with pytest.raises(EvalError, match=r"has no filter 'strict'; its filters: none"):
        prepare_suites(spec)


def test_empty_and_missing_data(tmp_path):
    folder = tmp_path / "t"
    write_task(folder, "empty_task", [])
    path = write_task(folder, "gone_task", [{"prompt": "1+1=", "answer": "2"}])
    (folder / "gone_task.jsonl").unlink()
    catalog = TaskCatalog([folder])
    with pytest.raises(
        EvalError, match=r"task empty_task .*the dataset is empty .*empty_task.jsonl"
    ):
        catalog.load(["empty_task"])
    with pytest.raises(EvalError, match=r"task gone_task .*data file not found: .*gone_task.jsonl"):
        catalog.load(["gone_task"])
    assert path.exists()


def test_rows_past_the_end(task_dir):
    spec = parse_fitness_spec(
        {
            "tasks": [
                {"task": "tiny_add", "metric": "exact_match", "rows": "0:99", "heldout": None}
            ],
            "include_path": [str(task_dir)],
        }
    )
    with pytest.raises(EvalError, match=r"rows 0:99 of task tiny_add run past its 24 documents"):
        prepare_suites(spec)


def test_hub_dataset_offline_fails_at_once(tmp_path):
    folder = tmp_path / "hub"
    write_task(
        folder,
        "hub_task",
        [],
        dataset_path="someorg/somedata",
        dataset_name="main",
        dataset_kwargs=None,
    )
    started = time.perf_counter()
    with pytest.raises(EvalError) as info:
        TaskCatalog([folder]).load(["hub_task"])
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert "task hub_task needs the dataset someorg/somedata (config main)" in message
    assert "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" in message
    assert "datasets.load_dataset('someorg/somedata', 'main')" in message


@pytest.mark.slow
def test_registered_task_offline_fails_before_the_model_loads(
    task_dir, tmp_path, monkeypatch, capsys
):
    # gsm8k is in lm-eval's registry but not downloaded here; the model path does not even exist,
    # so reaching the model would give a different error.
    args = ["eval", str(tmp_path / "no-model"), "--tasks", "gsm8k", "--include-path", str(task_dir)]
    started = time.perf_counter()
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert time.perf_counter() - started < 60  # indexing lm-eval's registry, no download attempt
    assert code == 2
    assert error_line(err).startswith(
        "error: task gsm8k needs the dataset openai/gsm8k (config main)"
    )


def test_cli_errors_exit_2(family, task_dir, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.yaml").write_text("task: bad_task\n  x: [\n")
    empty = tmp_path / "empty"
    write_task(empty, "empty_task", [])
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "tasks": [{"task": "tiny_add", "metric": "bleu", "heldout": None}],
                "include_path": [str(task_dir)],
            }
        )
    )
    model = str(family.base)
    cases = [
        (["--tasks", "nope_task", "--include-path", str(task_dir)], "unknown task 'nope_task'"),
        (["--tasks", "bad_task", "--include-path", str(broken)], "bad.yaml: malformed task YAML"),
        (["--tasks", "empty_task", "--include-path", str(empty)], "the dataset is empty"),
        (["--fitness", str(spec)], "does not produce metric 'bleu'"),
        (["--tasks", "tiny_add", "--fitness", str(spec)], "give exactly one of --tasks"),
        (
            ["--tasks", "tiny_add", "--include-path", str(tmp_path / "nowhere")],
            "include path is not a folder",
        ),
        (
            ["--tasks", "tiny_add", "--include-path", str(task_dir), "--batch-size", "0"],
            "--batch-size",
        ),
        (["--tasks", "tiny_add", "--include-path", str(task_dir), "--limit", "2.5"], "--limit"),
        (["--tasks", "tiny_add", "--num-fewshot", "-1"], "command line: num_fewshot"),
        (["--tasks", "tiny_add", "--max-gen-toks", "0"], "command line: generation.max_gen_toks"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["eval", model, *extra], monkeypatch, capsys)
        assert code == 2, (extra, err)
        assert message in error_line(err), (extra, err)
    code, _, err = run_cli(
        ["eval", str(tmp_path / "missing"), "--tasks", "tiny_add", "--include-path", str(task_dir)],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "no such model folder or recipe file" in err


def test_loglikelihood_tasks_score_like_plain_hflm(family, tmp_path):
    """Multiple-choice tasks go through loglikelihood; memoized tokenization changes nothing."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from evomerge.evals.spec import EvalSettings

    rows = [
        {"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0}
        for a, b in ((12, 7), (30, 4), (5, 5), (81, 9), (2, 60), (44, 4))
    ]
    write_task(
        tmp_path, "tiny_choice", rows,
        output_type="multiple_choice", doc_to_choice="choices", doc_to_target="label",
        target_delimiter=" ", generation_kwargs=None,
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )  # fmt: skip
    settings = EvalSettings(batch_size=4, bootstrap_iters=1000)
    suite = suite_from_names(TaskCatalog([tmp_path]), ["tiny_choice"], settings)
    candidate = load_candidate(family.experts[1], device="cpu")
    ours = Evaluator(candidate.model, candidate.tokenizer, {"tasks": suite}).score("tasks")
    plain = HFLM(pretrained=candidate.model, tokenizer=candidate.tokenizer, batch_size=4)
    loaded = TaskCatalog([tmp_path]).load(["tiny_choice"])
    reference = evaluate(lm=plain, task_dict=loaded, bootstrap_iters=1000)["results"]["tiny_choice"]
    assert [(s.metric, s.value, s.stderr) for s in ours.scores] == [
        (m, reference[f"{m},none"], reference[f"{m}_stderr,none"]) for m in ("acc", "acc_norm")
    ]


def test_plain_task_list_reports_every_metric(family, task_dir):
    from evomerge.evals.spec import EvalSettings

    suite = suite_from_names(
        TaskCatalog([task_dir]),
        ["tiny_add", "tiny_add_heldout"],
        EvalSettings(limit=3, batch_size=3),
    )
    candidate = load_candidate(family.base, device="cpu")
    result = Evaluator(candidate.model, candidate.tokenizer, {"tasks": suite}).score("tasks")
    assert [(s.task, s.metric, s.n) for s in result.scores] == [
        ("tiny_add", "exact_match", 3),
        ("tiny_add_heldout", "exact_match", 3),
    ]
    assert result.fitness is None
    assert "tiny_add_heldout" in result.table()


def test_eval_refuses_pickled_weights_unless_allowed(
    family, task_dir, tmp_path, monkeypatch, capsys
):
    """A folder with only pytorch_model.bin: pickles can run code, so `evomerge eval` refuses
    it (exit 2, one line) as merge and search do, and loads it with --allow-pickle."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(family.base, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    args = [
        "eval",
        str(folder),
        "--tasks",
        "tiny_add",
        "--include-path",
        str(task_dir),
        "--limit",
        "2",
    ]
    code, _, err = run_cli([*args, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and "pickled .bin weights" in error_line(err) and "--allow-pickle" in err
    candidate = load_candidate(folder, device="cpu", allow_pickle=True)
    assert candidate.model.num_parameters() > 0


# ---------------------------------------------------------------------------------------------
# batch_size "auto": fixed at the first requests, for their lengths


def test_auto_batch_size_is_sized_for_the_longest_request(family):
    from evomerge.evals.lm import CPU_BATCH_TOKENS

    candidate = load_candidate(family.base, device="cpu")
    lm = ResidentLM(candidate.model, candidate.tokenizer, batch_size="auto")
    lm.quiet = True
    assert lm.batch_size_per_gpu == "auto"  # nothing probed at construction
    requests = generation_requests(["."], 30, seed=2)
    longest = max(len(lm.tok_encode(r.args[0])) + r.args[1]["max_gen_toks"] for r in requests)
    lm.generate_until(requests)
    probe = lm.probe
    assert probe is not None and probe.length == longest and probe.how == "cpu token budget"
    expected = min(16, CPU_BATCH_TOKENS // longest)  # 30 requests: no batch above 16
    assert lm.batch_size_per_gpu == probe.batch_size == 1 << (expected.bit_length() - 1)
    short = generation_requests(["."], 3, seed=3)
    lm.generate_until(short)
    assert lm.probe.batch_size <= 2  # its own size: three requests
    lm.generate_until(requests)
    assert lm.probe is probe  # the same requests are batched as before, every time


def test_auto_batch_size_on_an_accelerator_doubles_while_a_batch_fits(family, monkeypatch):
    """The accelerator branch, with out-of-memory simulated above 8 sequences of the length."""
    candidate = load_candidate(family.base, device="cpu")
    lm = ResidentLM(candidate.model, candidate.tokenizer, batch_size="auto")
    tried: list[tuple[int, int]] = []
    real_call = lm._model_call

    def call(ids, **kwargs):
        tried.append(tuple(ids.shape))
        if ids.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(ids, **kwargs)

    monkeypatch.setattr(lm, "_model_call", call)
    assert lm._largest_fitting(length=20, cap=64) == 8
    assert tried == [(2, 20), (4, 20), (8, 20), (16, 20)]
    tried.clear()
    assert lm._largest_fitting(length=20, cap=4) == 4 and tried == [(2, 20), (4, 20)]
