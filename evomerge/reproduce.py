"""`evomerge reproduce`: rebuild a published merge from its recipe and check it bit for bit.

The recipe is read from the published folder: `evomerge_recipe.yaml` (whose first line records
evomerge's seed for random methods), else mergekit's `mergekit_config.yml`, else the first YAML
block of README.md that is a merge recipe. Verification reads both checkpoints one tensor at a
time and compares names, shapes, dtypes and the SHA-256 of each tensor's bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from evomerge.folder_checks import find_recipe
from evomerge.merge.compute import resolve_device
from evomerge.merge.errors import MergeError
from evomerge.merge.materialize import run_merge
from evomerge.merge.methods import get_method
from evomerge.merge.refs import ModelRef, resolve_model_dir
from evomerge.merge.weights import WeightIndex

MAX_TABLE_ROWS = 40  # beyond this, the table lists only failing tensors
DIFF_CHUNK = 1 << 24  # elements per step when computing a max abs difference
TOTALS = {
    "differs": "differ in content",
    "shape": "differ in shape",
    "dtype": "differ in dtype",
    "only published": "only in the published checkpoint",
    "only rebuilt": "only in the rebuild",
}


@dataclass(frozen=True)
class TensorFacts:
    shape: tuple[int, ...]
    dtype: str
    sha256: str


@dataclass(frozen=True)
class TensorRow:
    name: str
    result: str  # ok, differs, shape, dtype, only published, only rebuilt
    published: TensorFacts | None
    rebuilt: TensorFacts | None
    max_abs_diff: float | None = None

    @property
    def passed(self) -> bool:
        return self.result == "ok"


@dataclass(frozen=True)
class VerifyReport:
    rows: list[TensorRow]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    @property
    def failures(self) -> list[TensorRow]:
        return [row for row in self.rows if not row.passed]

    def table(self) -> str:
        shown = self.rows if len(self.rows) <= MAX_TABLE_ROWS else self.failures
        lines = []
        if shown:
            cells = [("tensor", "shape", "dtype", "max abs diff", "sha256", "result")]
            cells += [_cells(row) for row in shown]
            widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
            for line in cells:
                cell = (c.ljust(w) for c, w in zip(line, widths, strict=True))
                lines.append("  ".join(cell).rstrip())
        if len(shown) < len(self.rows):
            lines.append(f"({len(self.rows) - len(shown)} identical tensors not listed)")
        counts = Counter(row.result for row in self.rows)
        parts = [f"{counts.pop('ok', 0)} identical"]
        parts += [f"{counts[result]} {label}" for result, label in TOTALS.items() if counts[result]]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"verify {verdict}: {len(self.rows)} tensors: {', '.join(parts)}")
        return "\n".join(lines)


def reproduce(
    source: str,
    *,
    out: Path | None = None,
    verify: bool = False,
    device: str = "auto",
    allow_pickle: bool = False,
    echo: Callable[[str], None] = print,
) -> VerifyReport | None:
    """Rebuild the merge published at `source` (a folder, or a Hub id with an optional
    @revision) from its recipe into `out`; with `verify`, compare it with the published weights.
    """
    if out is None and not verify:
        raise MergeError("nothing to do: give --out DIR to keep the rebuild, --verify, or both")
    if out is not None and Path(out).exists():
        raise MergeError(f"{out}: already exists; give --out a new folder")
    published = _published_dir(source)
    found = find_recipe(published, source)
    seed = 0 if found.seed is None else found.seed
    stochastic = get_method(found.recipe.merge_method).stochastic
    with_seed = f", seed {seed}" if stochastic else ""
    echo(f"recipe: {found.origin} ({found.recipe.merge_method}{with_seed})")
    if stochastic and found.seed is None:
        echo(
            f"note: {found.recipe.merge_method} draws random masks and no evomerge seed is "
            "recorded: a merge made by mergekit or with another seed will not match bit for bit"
        )
    echo(revision_note(found.recipe.referenced_models()))
    theirs = safetensors_index(published, source) if verify else None  # fail before merging
    with contextlib.ExitStack() as stack:
        if out is None:
            temp = stack.enter_context(tempfile.TemporaryDirectory(prefix="evomerge-reproduce-"))
            target = Path(temp) / "rebuilt"
        else:
            target = Path(out)
        echo(f"rebuilding into {target}" + ("" if out else " (removed afterwards)"))
        try:
            run_merge(found.recipe, target, device=device, seed=seed, allow_pickle=allow_pickle)
        except MergeError as exc:
            raise MergeError(f"{found.origin}: {exc}") from None
        if out is not None:
            echo(f"wrote {target}")
        if theirs is None:
            return None
        report = compare(theirs, safetensors_index(target, str(target)))
    echo(report.table())
    if not report.passed and resolve_device(device).type != "cpu":
        echo(
            f"note: rebuilt on {resolve_device(device)}; a merge made on another device can "
            "differ in the last bits: try --device cpu"
        )
    return report


def _published_dir(source: str) -> Path:
    """The published folder (a Hub snapshot holds its weights, card and recipe files)."""
    return resolve_model_dir(source)


def revision_note(refs: list[str]) -> str:
    pinned = [ref for ref in refs if ModelRef.parse(ref).revision]
    loose = [ref for ref in refs if ref not in pinned]
    if not pinned:
        return "sources have no recorded revisions: using their current versions"
    note = f"sources at their recorded revisions: {', '.join(pinned)}"
    return note + (f"; no recorded revision (current version): {', '.join(loose)}" if loose else "")


def safetensors_index(folder: Path, name: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a checkpoint folder (sharded or single-file)."""
    files = {tensor: info.file for tensor, info in WeightIndex.read(folder, name).tensors.items()}
    if not files:
        pickled = " (it has only .bin weights)" if any(folder.glob("*.bin")) else ""
        raise MergeError(
            f"{name}: no safetensors weights to verify against{pickled}; "
            "verification reads safetensors only"
        )
    return files


def compare(published: dict[str, Path], rebuilt: dict[str, Path]) -> VerifyReport:
    """Every tensor of both checkpoints, read one pair at a time."""
    rows = []
    with contextlib.ExitStack() as stack:
        handles = {}

        def read(file: Path, name: str) -> torch.Tensor:
            if file not in handles:
                handles[file] = stack.enter_context(_open(file))
            try:
                return handles[file].get_tensor(name)
            except SafetensorError as exc:
                raise MergeError(f"{file}: cannot read {name}: {exc}") from None

        for name in sorted(published.keys() | rebuilt.keys()):
            theirs = read(published[name], name) if name in published else None
            ours = read(rebuilt[name], name) if name in rebuilt else None
            rows.append(_compare(name, theirs, ours))
    return VerifyReport(rows)


def _compare(name: str, theirs: torch.Tensor | None, ours: torch.Tensor | None) -> TensorRow:
    a = _facts(theirs) if theirs is not None else None
    b = _facts(ours) if ours is not None else None
    if a is None or b is None:
        return TensorRow(name, "only rebuilt" if a is None else "only published", a, b)
    if a.shape != b.shape:
        return TensorRow(name, "shape", a, b)
    if a.dtype == b.dtype and a.sha256 == b.sha256:
        return TensorRow(name, "ok", a, b, 0.0)
    result = "differs" if a.dtype == b.dtype else "dtype"
    return TensorRow(name, result, a, b, _max_abs_diff(theirs, ours))


def _facts(tensor: torch.Tensor) -> TensorFacts:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    dtype = str(tensor.dtype).removeprefix("torch.")
    return TensorFacts(tuple(tensor.shape), dtype, hashlib.sha256(data).hexdigest())


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    worst = torch.zeros((), dtype=torch.float64)
    for start in range(0, a.numel(), DIFF_CHUNK):
        part = slice(start, start + DIFF_CHUNK)
        worst = torch.maximum(worst, (a[part].double() - b[part].double()).abs().max())
    return worst.item()


def _cells(row: TensorRow) -> tuple[str, ...]:
    def pair(get: Callable[[TensorFacts], str]) -> str:
        sides = [get(facts) for facts in (row.published, row.rebuilt) if facts is not None]
        return sides[0] if len(set(sides)) == 1 else " vs ".join(sides)

    diff = "" if row.max_abs_diff is None else f"{row.max_abs_diff:.3g}"
    shape = pair(lambda f: str(list(f.shape)))
    sha = pair(lambda f: f.sha256[:12])
    return row.name, shape, pair(lambda f: f.dtype), diff, sha, row.result


@contextlib.contextmanager
def _open(file: Path) -> Iterator:
    try:
        handle = safe_open(str(file), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise MergeError(f"{file}: cannot read as safetensors: {exc}") from None
    with handle:
        yield handle
