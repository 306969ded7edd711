"""PS+DFS (Akiba et al. 2024, sec. 3.3): a parameter-space search, then a data-flow search over
the layers of its best merge and a partner model, compared on held-out data. `StagedSearch` runs
the two `Search`es with the same `run` signature as one."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from evomerge.merge.recipe import Recipe
from evomerge.merge.staging import write_text
from evomerge.search.config import PsDfsSpec, SearchRecipe
from evomerge.search.errors import SearchError
from evomerge.search.executor import Executor
from evomerge.search.loop import Echo, Search
from evomerge.search.records import ModelScores, SearchSummary


def stage_recipes(
    recipe: SearchRecipe, out: Path, model_a: str | None = None
) -> tuple[SearchRecipe, SearchRecipe]:
    """The two searches of a PS+DFS recipe: the parameter-space one, and the data-flow one over
    the layers of its best merge (written to out/ps/model, or `model_a`) and the partner."""
    spec = recipe.space
    assert isinstance(spec, PsDfsSpec)
    merge = recipe.merge
    others = [m.model for m in merge.models or [] if m.model != merge.base_model]
    partner = spec.partner or (others[0] if others else None)
    if partner is None:
        raise SearchError("space.partner: name the model whose layers join the PS merge's")
    a = model_a or str(out / "ps" / "model")
    ps = recipe.model_copy(update={"space": spec.ps, "study_name": f"{recipe.study_name}-ps"})
    dfs_merge = Recipe.model_validate(
        {
            "merge_method": "passthrough",
            "base_model": a,
            "models": [{"model": a}, {"model": partner}],
            "dtype": merge.dtype,
        }
    )
    dfs = recipe.model_copy(
        update={
            "merge": dfs_merge,
            "space": spec.dfs,
            "study_name": f"{recipe.study_name}-dfs",
            "baselines": [],  # the PS stage is judged against them
        }
    )
    return ps, dfs


@dataclass
class StagedSearch:
    """PS+DFS: a parameter-space search into out/ps, then a data-flow search over its best
    merge and the partner into out/dfs; out/report.md compares the two on held-out data."""

    recipe: SearchRecipe
    out: Path
    storage: str | None
    title: str

    def run(
        self,
        *,
        resume: bool = False,
        echo: Echo = print,
        progress: bool = True,
        executor: Executor | None = None,
        write_model: bool = True,
        allow_changed_sources: bool = False,
    ) -> SearchSummary:
        """Both stages; the PS stage always writes its model (the DFS stage reads its layers)."""
        if executor is not None:
            raise SearchError("PS+DFS builds each stage's executor itself; pass none")
        ps_recipe, dfs_recipe = stage_recipes(self.recipe, self.out)
        echo("stage 1 of 2: parameter space")
        ps = Search.prepare(
            ps_recipe, self.out / "ps", storage=self.storage, title=f"{self.title} PS"
        )
        ps_summary = ps.run(resume=resume, echo=echo, progress=progress,
                            allow_changed_sources=allow_changed_sources)  # fmt: skip
        partner = dfs_recipe.merge.models[1].model  # type: ignore[index]
        echo(f"stage 2 of 2: data flow over the PS merge and {partner}")
        dfs = Search.prepare(
            dfs_recipe, self.out / "dfs", storage=self.storage, title=f"{self.title} PS+DFS"
        )
        summary = dfs.run(resume=resume, echo=echo, progress=progress, write_model=write_model,
                          allow_changed_sources=allow_changed_sources)  # fmt: skip
        write_text(self.out / "report.md", _stages_report(self.title, ps_summary, summary))
        write_text(self.out / "summary.json", json.dumps(self._summary(), indent=2) + "\n")
        echo(f"wrote {self.out / 'report.md'}")
        return summary

    def _summary(self) -> dict:
        """Both stages' summary.json in one: counts added up, the best is stage 2's."""
        stages = {s: json.loads((self.out / s / "summary.json").read_text()) for s in ("ps", "dfs")}
        total = {
            key: sum(stage[key] for stage in stages.values())
            for key in ("evaluations", "failed", "stopped", "rows_scored", "rows_full_search")
        }
        return {
            "title": self.title,
            **total,
            "mode": stages["dfs"]["mode"],
            "rows_share": total["rows_scored"] / total["rows_full_search"],
            "wall_seconds": sum(stage["wall_seconds"] for stage in stages.values()),
            "search_seconds": sum(stage["search_seconds"] for stage in stages.values()),
            "best": stages["dfs"]["best"],
            "stages": stages,
        }


def _stages_report(title: str, ps: SearchSummary, dfs: SearchSummary) -> str:
    def best(summary: SearchSummary) -> ModelScores:
        return next(r for r in summary.references if r.kind == "best")

    a, b = best(ps), best(dfs)
    rows = ["| stage | best held-out total ± stderr | folder |", "| --- | --- | --- |"]
    for name, ref, folder in (("PS", a, "ps/"), ("PS+DFS", b, "dfs/")):
        rows.append(
            f"| {name} | {ref.heldout_total:.4f} ± {ref.heldout_total_stderr or 0:.4f} | "
            f"[{folder}report.md]({folder}report.md) |"
        )
    margin = math.hypot(a.heldout_total_stderr or 0, b.heldout_total_stderr or 0)
    gain = (b.heldout_total or 0) - (a.heldout_total or 0)
    verdict = "beats" if gain > margin else "does not beat"
    return "\n".join(
        [
            f"# {title}: PS+DFS",
            "",
            *rows,
            "",
            f"PS+DFS **{verdict}** PS on held-out data: {gain:+.4f} against a combined stderr "
            f"of {margin:.4f}.",
            "",
        ]
    )
