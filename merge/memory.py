"""What an in-memory merge holds, planned from the sources' headers before a tensor is read: the
sources as the resident merger keeps them (merge/resident.py), the model candidates are written
into, the merge math's workspace and one scoring batch's activations; on the device or on the
host, by placement. `--dry-run` prints it; a search refuses a placement that cannot fit."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from evomerge.merge.methods import chunks, fused
from evomerge.merge.methods.task_arithmetic import span_bytes
from evomerge.merge.plan import MergePlan, TensorTask

# The merge math's full-size temporaries for one tensor, a + b * k tensors of its size in the
# compute dtype for k inputs (base included), by method and compute itemsize (4: float32,
# 2: 16-bit, which upcasts some steps). Sparsifying methods: the sparsified task vectors and one
# model's sparsification at a time. Linear and the task-vector sum work a span at a time
# (methods/chunks.py): their buffers are counted exactly, not measured. Measured as the peak of
# allocations during ResidentMerger.materialize on the demo and tiny families (k = 2, 3, 4):
# tests/test_memory_plan.py checks them within 10 %. Other methods: WORKSPACE_OTHER, unmeasured.
WORKSPACE: dict[str, dict[int, tuple[float, float]]] = {
    "slerp": {4: (3, 0), 2: (6, 0)},
    "dare_linear": {4: (3, 1), 2: (3, 1)},
    "breadcrumbs": {4: (4, 1), 2: (8, 1)},
    "della_linear": {4: (7, 1), 2: (9, 1)},
    "ties": {4: (-1, 3.25), 2: (5, 2)},
    "dare_ties": {4: (-1, 3.25), 2: (-1, 3.5)},
    "breadcrumbs_ties": {4: (-1, 3.25), 2: (5, 2)},
    "della": {4: (1, 3), 2: (3, 3)},
}
# With the fused combine (a CPU, bfloat16 or float32: methods/fused.py) a sparsifying method's
# peak is its sparsification's, the same with or without sign election: by sparsification,
# measured likewise (peak of merge_deltas on 1024 x 1024 tensors, k = 2, 3, 4). Where fused.c
# draws DARE's and DELLA's masks, only the sparsified task vectors are allocated (counted).
WORKSPACE_FUSED: dict[str, dict[int, tuple[float, float]]] = {
    "magnitude": {4: (4, 1), 2: (8, 1)},
    "magnitude_outliers": {4: (4, 1), 2: (8, 1)},
}
WORKSPACE_OTHER = (2, 2)
# Evaluation: one batch of `batch` sequences of `length` tokens, no gradients. Per token, the
# widest layer's activations (MLP: 3 x intermediate) plus the float32 logits and their
# log-softmax (lm-eval scores log-likelihoods from them).
EVAL_BATCH, EVAL_LENGTH = 8, 512


@dataclass(frozen=True)
class MemoryPlan:
    sources: int  # the resident sources (base and deltas for task-vector methods)
    model: int  # the model each candidate is materialized into
    workspace: int  # the merge math's temporaries for the largest tensor
    evaluation: int  # one scoring batch (estimate: EVAL_BATCH x EVAL_LENGTH unless told)
    # Host placement: the most that two consecutive tasks' inputs hold (one computing, the
    # next one's copied ahead), what it has on the device at a time besides the model.
    streamed: int

    def device_bytes(self, placement: str) -> int:
        streamed = self.sources if placement == "device" else self.streamed
        return self.model + self.workspace + self.evaluation + streamed

    def host_bytes(self, placement: str) -> int:
        return 0 if placement == "device" else self.sources

    def lines(self) -> list[str]:
        rows = [
            f"memory plan (from the headers; evaluation: batch {EVAL_BATCH} x {EVAL_LENGTH} "
            "tokens, an estimate):",
            f"  sources {size(self.sources)}, model {size(self.model)}, merge workspace "
            f"{size(self.workspace)}, evaluation {size(self.evaluation)}",
        ]
        for placement in ("device", "host"):
            rows.append(
                f"  sources: {placement:<6}  device {size(self.device_bytes(placement))}, "
                f"host {size(self.host_bytes(placement))}"
            )
        return rows


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _numel(task: TensorTask) -> int:
    return math.prod(task.shape)


def uses_deltas(plan: MergePlan, task: TensorTask, floating: bool) -> bool:
    """The resident merger keeps base and deltas for this task (as ResidentMerger decides)."""
    return (
        "sparsification" in plan.method.extras
        and task.base_index is not None
        and len(task.inputs) > 1
        and floating
    )


def _workspace(
    plan: MergePlan,
    task: TensorTask,
    numel: int,
    size: int,
    deltas: bool,
    model: torch.dtype,
    device: torch.device,
) -> int:
    k, name, extras = len(task.inputs), plan.method.name, plan.method.extras
    # Linear and task-vector sums write straight into a model parameter of their dtype; into
    # another dtype, through a full-size result.
    result = 0 if model == task.compute_dtype == task.out_dtype else numel * size
    # On a CPU, fused.c does linear merges and task-vector sums with no torch buffers at all.
    fused_here = (
        device.type == "cpu"
        and task.compute_dtype in (torch.bfloat16, torch.float32)
        and k - 1 <= fused.MAX_MODELS
        and fused.library() is not None
    )
    if name == "linear":
        accumulator = 8 if size == 8 else 4  # float32 (float64 for float64 inputs)
        return result + (0 if fused_here else chunks.span_size(numel, device=device) * accumulator)
    if deltas:
        span = chunks.span_size(numel, chunks.LONG, device)
        buffers = span * span_bytes(k - 1, size, extras["consensus"])
        combine = result + (0 if fused_here else buffers)
        kind = extras["sparsification"]
        if kind is None:
            return combine
        consensus, dtype = extras["consensus"], task.compute_dtype
        if fused_here and fused.selects_in_combine(kind, consensus, task.shared, dtype):
            return combine  # no sparsified task vectors
        sparse = (k - 1) * numel * size
        if fused_here and fused.draws_masks(kind, dtype, device):
            # float32 L1 norms after masking are torch's sums, over a full-size |x|
            after = numel * size if dtype == torch.float32 and task.shared.get("rescale") else 0
            return sparse + combine + after
        table = WORKSPACE_FUSED.get(kind, {}) if fused_here else WORKSPACE.get(name, {})
        a, b = table.get(size, WORKSPACE_OTHER)
        return max(int((a + b * k) * numel * size), sparse + combine)
    a, b = WORKSPACE.get(name, {}).get(size, WORKSPACE_OTHER)
    return int((a + b * k) * numel * size)


def _derived(plan: MergePlan, task: TensorTask, numel: int, size: int, device) -> int:
    """What fused.prepare keeps beside the task vectors: DELLA's rank norms, one per task vector
    (not for tensors of one entry per row, which the eager path merges)."""
    kind = plan.method.extras.get("sparsification")
    if not fused.keeps_rank_norms(kind, task.shape, task.compute_dtype, device):
        return 0
    return (len(task.inputs) - 1) * numel * size


def plan_memory(
    plan: MergePlan,
    config: dict,
    *,
    batch: int = EVAL_BATCH,
    length: int = EVAL_LENGTH,
    model_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> MemoryPlan:
    """The plan of `plan` (headers only) and the merged model's `config` (output_config), for
    merging on `device` (a GPU works in longer spans: methods/chunks.py)."""
    device = torch.device(device)
    sources = model = workspace = 0
    inputs: list[int] = []  # each task's input bytes, in the order the merger streams them
    seen: set[tuple[str, str]] = set()
    for task in plan.tasks:
        numel = _numel(task)
        header = plan.checkpoints[task.inputs[0][0]].tensors[task.inputs[0][1]]
        floating = header.dtype.is_floating_point
        size = task.compute_dtype.itemsize if floating else header.dtype.itemsize
        model += numel * (model_dtype or task.out_dtype).itemsize
        if uses_deltas(plan, task, floating):
            kept = [task.inputs[task.base_index]]  # type: ignore[index]
            deltas = (len(task.inputs) - 1) * numel * size
        else:
            kept, deltas = list(task.inputs), 0
        fresh = [key for key in kept if key not in seen]
        seen.update(fresh)
        sources += len(fresh) * numel * size + deltas
        if deltas:
            sources += _derived(plan, task, numel, size, device)
        inputs.append(len(task.inputs) * numel * size)
        if floating:
            dtype = model_dtype or task.out_dtype
            workspace = max(
                workspace, _workspace(plan, task, numel, size, deltas > 0, dtype, device)
            )
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size", 0))
    wide = max(int(text.get("intermediate_size", 0)) * 3, hidden * 4)
    vocab = int(text.get("vocab_size", 0))
    itemsize = (model_dtype or plan.tasks[0].out_dtype).itemsize if plan.tasks else 4
    evaluation = batch * length * (wide * itemsize + 2 * vocab * 4)
    streamed = max((a + b for a, b in itertools.pairwise(inputs)), default=sum(inputs))
    return MemoryPlan(sources, model, workspace, evaluation, streamed)


def free_bytes(device: torch.device) -> int:
    """Memory free for this process on `device` now: CUDA's free memory, else the host's
    available memory (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
