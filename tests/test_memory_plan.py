"""The memory plan (merge/memory.py) against what the resident merger holds, the placement of the
sources (device or host: the same merge bit for bit), and a placement that cannot fit refused
before anything loads."""

from __future__ import annotations

import pytest
import torch
from families import build_tiny_family
from helpers import write_recipe

from evomerge.merge.materialize import output_config, run_merge
from evomerge.merge.memory import plan_memory
from evomerge.merge.methods import fused
from evomerge.merge.plan import build_plan
from evomerge.merge.recipe import parse_recipe
from evomerge.merge.resident import ResidentMerger
from evomerge.search.config import load_search_recipe
from evomerge.search.errors import SearchError
from evomerge.search.space import choose_placement


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("memory"), arch="llama", n_experts=3, seed=4)


def recipe(family, method: str, dtype: str = "float32"):
    models = [
        {"model": str(e), "parameters": {"weight": 0.4 + 0.1 * i, "density": 0.6}}
        for i, e in enumerate(family.experts)
    ]
    if method in ("linear", "slerp"):
        models = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}}
                  for m in models]  # fmt: skip
    data = {"merge_method": method, "models": models, "dtype": dtype}
    if method == "slerp":
        data = {"merge_method": "slerp", "base_model": str(family.base), "dtype": dtype,
                "models": [{"model": str(family.base)}, {"model": str(family.experts[0])}],
                "parameters": {"t": 0.3}}  # fmt: skip
    elif method != "linear":
        data["base_model"] = str(family.base)
    return parse_recipe(data)


@pytest.mark.parametrize(
    ("method", "dtype"),
    [("dare_ties", "float32"), ("ties", "bfloat16"), ("task_arithmetic", "float32"),
     ("linear", "float32"), ("slerp", "bfloat16"), ("della", "bfloat16"), ("della", "float32")],
)  # fmt: skip
def test_the_plan_is_what_the_resident_merger_holds(family, method, dtype):
    """Sources as held: base and task vectors, and for DELLA on a CPU the rank norms fused.c
    keeps beside them (as large as the task vectors)."""
    merge = recipe(family, method, dtype)
    plan = build_plan(merge)
    memory = plan_memory(plan, output_config(plan))
    merger = ResidentMerger(merge, device="cpu")
    model = merger.build_model()
    assert memory.sources == merger.resident_bytes()
    tasks = {t.out_name for t in merger.tasks}
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in tasks)
    assert memory.model == held
    assert memory.device_bytes("host") < memory.device_bytes("device")
    assert memory.host_bytes("host") == memory.sources and memory.host_bytes("device") == 0


@pytest.mark.parametrize("method", ["dare_ties", "linear"])
def test_host_placement_makes_the_same_merge_bit_for_bit(family, method, tmp_path):
    merge = recipe(family, method)
    models = {}
    for placement in ("device", "host"):
        merger = ResidentMerger(merge, device="cpu", seed=7, placement=placement)
        models[placement] = dict(merger.build_model().state_dict())
    run_merge(merge, tmp_path / "file", device="cpu", seed=7, progress=False)
    from safetensors.torch import load_file

    written = load_file(tmp_path / "file" / "model.safetensors")
    for name, tensor in written.items():
        assert torch.equal(models["device"][name], tensor), name
        assert torch.equal(models["host"][name], tensor), name


def test_an_unknown_placement_is_one_line(family):
    from evomerge.merge.errors import MergeError

    with pytest.raises(MergeError, match="sources: 'disk'; use one of device, host"):
        ResidentMerger(recipe(family, "linear"), device="cpu", placement="disk")


@pytest.fixture
def search_recipe(demo_family, tmp_path):
    def make(**changes):
        return load_search_recipe(write_recipe(tmp_path / "r.yaml", demo_family, **changes))

    return make


def test_a_placement_that_cannot_fit_is_refused_before_loading(search_recipe, monkeypatch):
    import evomerge.merge.memory as memory
    import evomerge.merge.resident as resident

    def never(*args, **kwargs):
        raise AssertionError("nothing may load before the memory check")

    monkeypatch.setattr(resident.ResidentMerger, "__init__", never)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**20)  # 1 MiB free
    recipe = search_recipe()
    from evomerge.search.loop import make_space

    space = make_space(recipe)
    refused = r"^sources: device: the memory plan needs 23\.2 MiB on cpu, which has 1\.0 MiB free"
    with pytest.raises(SearchError, match=refused):
        space.make_executor(recipe, {})


@pytest.mark.parametrize(
    ("sources", "free_mib", "expected"),
    [("auto", 30, "device"), ("auto", 20, "host"), ("host", 30, "host"), ("device", 30, "device"),
     ("auto", 10, "sources: host: the memory plan needs 17.2 MiB on cuda, which has 10.0 MiB"),
     ("device", 20, "needs 24.0 MiB on cuda, which has 20.0 MiB free (evomerge search --dry-run "
      "prints the plan); try sources: host")],
)  # fmt: skip
def test_auto_takes_the_device_when_it_fits_and_else_the_host(
    search_recipe, monkeypatch, sources, free_mib, expected
):
    """On a (pretended) GPU with `free_mib` free: the demo plan needs 24.0 MiB on the device
    with the sources there, 17.2 MiB when they stay on the host."""
    import evomerge.merge.compute as compute
    import evomerge.merge.memory as memory

    monkeypatch.setattr(compute, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: free_mib * 2**20)
    from evomerge.search.loop import make_space

    recipe = search_recipe(sources=sources)
    space = make_space(recipe)
    first = space.to_recipe(space.init())
    if expected in ("device", "host"):
        assert choose_placement(first, recipe) == expected
    else:
        with pytest.raises(SearchError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            choose_placement(first, recipe)


SCALARS = 1024  # bytes of a merge's weights and sums, which the plan does not count
SEARCHABLE = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
              "breadcrumbs_ties", "della", "della_linear", "slerp"]  # fmt: skip


def method_recipe(base, experts, method: str, dtype: str):
    extra = {"epsilon": 0.1} if "della" in method else {"gamma": 0.01} if "bread" in method else {}
    models = [{"model": str(e), "parameters": {"weight": 0.4, "density": 0.6, **extra}}
              for e in experts]  # fmt: skip
    data = {"merge_method": method, "models": models, "dtype": dtype, "base_model": str(base)}
    if method == "linear":
        del data["base_model"]
        for m in models:
            m["parameters"] = {"weight": 0.4}
    if method == "slerp":
        data["models"] = [{"model": str(base)}, {"model": str(experts[0])}]
        data["parameters"] = {"t": 0.3}
    return parse_recipe(data)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", SEARCHABLE)
def test_the_planned_workspace_is_the_measured_one_within_10_percent(
    method, dtype, family, demo_family
):
    """Peak allocations while a candidate is materialized (tests/allocations.py tracks every
    tensor torch makes, as CPU torch keeps no allocator statistics) against the plan."""
    from allocations import PeakAllocations

    families = [(family.base, family.experts), (demo_family / "base",
                [demo_family / "expert_a", demo_family / "expert_b"])]  # fmt: skip
    for base, experts in families:
        merge = method_recipe(base, experts, method, dtype)
        plan = build_plan(merge)
        planned = plan_memory(plan, output_config(plan)).workspace
        merger = ResidentMerger(merge, device="cpu", seed=1)
        model = merger.build_model()
        fused.release_scratch()  # kept between candidates: allocated again, and measured
        with PeakAllocations() as seen:
            merger.materialize(model)
        assert abs(planned - seen.peak) <= 0.1 * seen.peak + SCALARS, (base, planned, seen.peak)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_a_model_in_another_dtype_is_planned_with_the_full_size_result(method, family):
    """A bfloat16 merge into a float32 model goes through a full-size result, not straight
    into the parameters: the plan counts it."""
    from allocations import PeakAllocations

    merge = method_recipe(family.base, family.experts, method, "bfloat16")
    plan = build_plan(merge)
    planned = plan_memory(plan, output_config(plan), model_dtype=torch.float32).workspace
    merger = ResidentMerger(merge, device="cpu", seed=1)
    model = merger.build_model(dtype=torch.float32)
    fused.release_scratch()
    with PeakAllocations() as seen:
        merger.materialize(model)
    assert abs(planned - seen.peak) <= 0.1 * seen.peak + SCALARS, (planned, seen.peak)
