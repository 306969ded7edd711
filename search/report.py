"""A search's report: `report.md` with tables and the held-out verdict, plus PNG plots of fitness
per generation, the best genome per layer group, reference scores and the Pareto front.

Higher fitness and higher scores are taken as better. Plots use matplotlib's object API
(`Figure`, no pyplot state), so nothing global changes and nothing needs closing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from evomerge.search.records import ModelScores, SearchSummary, TrialRecord

STAGES = ("materialize", "evaluate", "optimizer")  # shown first, in this order, in the time split
MAX_FAILURES = 5  # failure messages quoted in the report
PNG_METADATA = {"Software": None}  # keep the PNGs byte-stable across matplotlib versions


def write_report(summary: SearchSummary, out_dir: Path) -> Path:
    """Write `report.md` and its PNGs into `out_dir` (created if needed); return the report path.
    A plot with nothing to show is skipped and the report says why."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "fitness.png": ("Fitness per generation", _plot_fitness),
        "best_parameters.png": ("Best genome", _plot_best_parameters),
        "scores.png": ("Reference scores", _plot_scores),
        "pareto.png": ("Pareto front", _plot_pareto),
    }
    images: list[tuple[str, str, str | None]] = []  # (caption, file, reason when skipped)
    for name, (caption, plot) in plots.items():
        path = out_dir / name
        path.unlink(missing_ok=True)  # a rerun must not leave a stale plot behind
        images.append((caption, name, plot(summary, path)))
    report = out_dir / "report.md"
    report.write_text(render_markdown(summary, images), encoding="utf-8")
    return report


# --- helpers -----------------------------------------------------------------------------------


def completed(trials: Iterable[TrialRecord]) -> list[TrialRecord]:
    return [t for t in trials if not t.outcome.failed]


def failed(trials: Iterable[TrialRecord]) -> list[TrialRecord]:
    return [t for t in trials if t.outcome.failed]


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def _cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _entries(refs: Sequence[ModelScores], split: str) -> list[str]:
    """Task entries of a split over all references, in order of first appearance."""
    names: dict[str, None] = {}
    for ref in refs:
        names.update(dict.fromkeys(getattr(ref, split)))
    return list(names)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _layer_label(layers: tuple[int, int] | None) -> str:
    return "all" if layers is None else f"{layers[0]}-{layers[1] - 1}"


# --- held-out verdict and time split -----------------------------------------------------------


def heldout_verdict(refs: Sequence[ModelScores]) -> tuple[bool | None, list[str]]:
    """Whether the 'best' reference beats every other one (sources, the uniform merge and the
    baselines) on each held-out entry by more than sqrt(s1² + s2²). Returns (verdict,
    shortfalls); verdict None when there is nothing to compare. A missing score or stderr is a
    shortfall: the margin cannot be shown."""
    best = next((r for r in refs if r.kind == "best"), None)
    others = [r for r in refs if r.kind != "best"]
    if best is None or not others or not best.heldout:
        return None, []
    shortfalls = []
    for other in others:
        for entry in _entries([best, other], "heldout"):
            if entry not in best.heldout or entry not in other.heldout:
                missing = other.name if entry in best.heldout else best.name
                shortfalls.append(f"{entry}: no score for {missing}")
                continue
            (v1, s1), (v2, s2) = best.heldout[entry], other.heldout[entry]
            if s1 is None or s2 is None:
                shortfalls.append(
                    f"{entry}: {_fmt(v1)} vs {other.name} {_fmt(v2)}, stderr unknown"
                )
                continue
            margin = math.hypot(s1, s2)
            if v1 - v2 <= margin:
                shortfalls.append(
                    f"{entry}: {_fmt(v1)} vs {other.name} {_fmt(v2)} "
                    f"(difference {v1 - v2:+.4f}, combined stderr {margin:.4f})"
                )
    return not shortfalls, shortfalls


def decoding_lines(done: Sequence[TrialRecord]) -> list[str]:
    """How the candidates' generations were decoded; the slow path is named with its reason."""
    paths: dict[str, int] = {}
    for t in done:
        if t.outcome.decoding is not None:
            paths[t.outcome.decoding] = paths.get(t.outcome.decoding, 0) + 1
    if not paths:
        return []
    fast = paths.pop("fast greedy", 0)
    if not paths:
        return [f"Decoding: the fast greedy path (evals/greedy.py) for all {fast} candidates.", ""]
    lines = [f"Decoding: **without the fast greedy path** for {sum(paths.values())} of "
             f"{fast + sum(paths.values())} candidates (lm-eval's generate(), several times "
             "slower):", ""]
    return lines + [f"- {count} candidates: {path}" for path, count in paths.items()] + [""]


def time_split(trials: Iterable[TrialRecord]) -> list[tuple[str, float, float]]:
    """(stage, mean seconds over completed trials that timed it, share of the summed means)."""
    done = completed(trials)
    stages = list(STAGES) + sorted({k for t in done for k in t.outcome.seconds} - set(STAGES))
    means = []
    for stage in stages:
        values = [t.outcome.seconds[stage] for t in done if stage in t.outcome.seconds]
        if values:
            means.append((stage, sum(values) / len(values)))
    total = sum(m for _, m in means)
    return [(stage, m, m / total if total > 0 else 0.0) for stage, m in means]


# --- report.md ---------------------------------------------------------------------------------


def render_markdown(summary: SearchSummary, images: Sequence[tuple[str, str, str | None]]) -> str:
    lines = [f"# {summary.title or 'Search report'}", ""]
    if summary.settings:
        lines += ["## Settings", "", *_table(["setting", "value"], summary.settings.items()), ""]
    lines += results_section(summary.references)
    lines += cost_section(summary)
    lines += _trials_section(summary)
    lines += _best_section(summary)
    if summary.pareto and len(summary.objectives) >= 2:
        by_number = {t.number: t for t in summary.trials}
        rows = [
            [n, *(_fmt(by_number[n].outcome.scores.get(o)) for o in summary.objectives)]
            for n in summary.pareto
            if n in by_number
        ]
        lines += ["## Pareto front", "", *_table(["trial", *summary.objectives], rows), ""]
    lines += ["## Plots", ""]
    for caption, name, reason in images:
        lines += [f"![{caption}]({name})" if reason is None else f"{caption}: not drawn, {reason}."]
        lines += [""]
    return "\n".join(lines)


def results_section(refs: Sequence[ModelScores]) -> list[str]:
    lines = ["## Results", ""]
    if not refs:
        return [*lines, "No reference scores.", ""]
    fit, held = _entries(refs, "fitness"), _entries(refs, "heldout")
    header = ["model", "kind", "evaluations", *(f"fitness: {e}" for e in fit), "fitness total"]
    header += [*(f"held-out: {e}" for e in held), "held-out total"]
    rows = []
    for r in refs:
        row = [r.name, r.kind, "-" if r.cost is None else r.cost]
        row += [_fmt(*r.fitness[e]) if e in r.fitness else "-" for e in fit]
        row += [_fmt(r.fitness_total)]
        row += [_fmt(*r.heldout[e]) if e in r.heldout else "-" for e in held]
        row += [_fmt(r.heldout_total, r.heldout_total_stderr)]
        rows.append(row)
    lines += [*_table(header, rows), ""]
    lines += ["Evaluations: the fitness evaluations spent finding the model (the search's "
              "trials, the grid's values, the random search's trials; 0 for a source or a fixed "
              "recipe).", ""]
    verdict, shortfalls = heldout_verdict(refs)
    claim = "every other model above on each held-out entry by more than the combined stderr "
    claim += "sqrt(s1² + s2²)"
    if verdict is None:
        lines += ["No held-out comparison: it needs held-out scores of the best merge and of "
                  "another model.", ""]
    elif verdict:
        lines += [f"The best merge **beats** {claim}.", ""]
    else:
        lines += [f"The best merge **does not beat** {claim}:", ""]
        lines += [*(f"- {s}" for s in shortfalls), ""]
    return lines


def cost_section(summary: SearchSummary) -> list[str]:
    """What the fitness cost: rows scored against a search that scores every row, beside the
    held-out result it bought; and the re-scored estimates."""
    cost = summary.cost
    if not cost:
        return []
    share = cost["rows_scored"] / cost["rows_full_search"] if cost["rows_full_search"] else 0.0
    best = next((r for r in summary.references if r.kind == "best"), None)
    heldout = _fmt(best.heldout_total, best.heldout_total_stderr) if best else "-"
    lines = [
        "## Fitness cost",
        "",
        f"Mode **{cost['mode']}**: {cost['rows_scored']:,} fitness rows scored, {share:.1%} of "
        f"the {cost['rows_full_search']:,} a full search of these {len(summary.trials)} trials "
        f"scores ({cost['rows_outside_trials']:,} of them re-scoring the best estimates); "
        f"{cost['stopped']} trials stopped early. Best held-out total: {heldout}.",
        "",
    ]
    if cost["rescored"]:
        by_number = {t.number: t for t in summary.trials}
        rows = [
            (n, _fmt(by_number[n].outcome.fitness, by_number[n].outcome.fitness_stderr),
             _fmt(cost["exact"][str(n)]))
            for n in cost["rescored"]
        ]  # fmt: skip
        lines += ["Re-scored on every fitness row before the best was chosen:", ""]
        lines += [*_table(["trial", "estimate ± stderr", "full-set fitness"], rows), ""]
    return lines


def _trials_section(summary: SearchSummary) -> list[str]:
    done, bad = completed(summary.trials), failed(summary.trials)
    lines = ["## Trials", "", f"{len(done)} completed, {len(bad)} failed.", ""]
    if not done:
        lines += ["No trial completed.", ""]
    lines += decoding_lines(done)
    split = time_split(summary.trials)
    if split:
        lines += ["Time per candidate (mean over completed trials):", ""]
        lines += [*_table(["stage", "mean s", "share"],
                          [(s, f"{m:.2f}", f"{share:.0%}") for s, m, share in split]), ""]
    if bad:
        lines += [f"First failures ({min(len(bad), MAX_FAILURES)} of {len(bad)}):", ""]
        for t in bad[:MAX_FAILURES]:
            message = " ".join((t.outcome.error or "no message").split())
            lines += [f"- trial {t.number} (generation {t.generation}): {message[:500]}"]
        lines += [""]
    return lines


def _best_section(summary: SearchSummary) -> list[str]:
    best = summary.best
    lines = ["## Best", ""]
    if best is None or best.outcome.failed:
        return [*lines, "No best trial.", ""]
    fitness = _fmt(best.outcome.fitness, best.outcome.fitness_stderr)
    lines += [f"Trial {best.number} (generation {best.generation}), fitness {fitness}.", ""]
    if summary.best_recipe_yaml:
        lines += ["```yaml", summary.best_recipe_yaml.rstrip("\n"), "```", ""]
    return lines


# --- plots: each returns None when it wrote `path`, or why it did not ----------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # a cramped layout still makes a readable plot
        warnings.filterwarnings("ignore", message="constrained_layout not applied")
        fig.savefig(path, format="png", dpi=110, metadata=PNG_METADATA)


def _plot_fitness(summary: SearchSummary, path: Path) -> str | None:
    if not summary.trials:
        return "no trials"
    done, bad = completed(summary.trials), failed(summary.trials)
    fitness = [t.outcome.fitness for t in done]
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    if done:
        ax.scatter([t.generation for t in done], fitness,
                   s=12, alpha=0.3, color="tab:blue", label="trial")
        gens = sorted({t.generation for t in done})
        per_gen = [[t.outcome.fitness for t in done if t.generation == g] for g in gens]
        best = [max(f) for f in per_gen]
        ax.plot(gens, [sum(f) / len(f) for f in per_gen], "-o", ms=3, color="tab:blue",
                label="generation mean")
        ax.plot(gens, best, "-o", ms=3, color="tab:green", label="generation best")
        so_far = [max(best[: i + 1]) for i in range(len(best))]
        ax.step([*gens, gens[-1] + 0.5], [*so_far, so_far[-1]], where="post", color="black",
                lw=1.5, label="best so far")
    else:
        ax.text(0.5, 0.6, "no completed trials", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_yticks([])
    if bad:  # just below the lowest completed fitness
        low, high = (min(fitness), max(fitness)) if fitness else (0.0, 0.0)
        y = low - 0.05 * ((high - low) or 1.0)
        ax.scatter([t.generation for t in bad], [y] * len(bad), marker="x", color="red",
                   label=f"failed ({len(bad)})")
    ax.set(xlabel="generation", ylabel="fitness", title="Fitness per generation")
    generations = sorted({t.generation for t in summary.trials})
    ax.set_xlim(generations[0] - 0.5, generations[-1] + 0.5)
    if len(generations) <= 20:
        ax.set_xticks(generations)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    return None


def _plot_best_parameters(summary: SearchSummary, path: Path) -> str | None:
    best = summary.best
    if best is None or not summary.genes:
        return "no best trial"
    import numpy as np

    rows = list(dict.fromkeys(g.row for g in summary.genes))
    groups = sorted({g.layers for g in summary.genes}, key=lambda x: (-1, -1) if x is None else x)
    color = np.full((len(rows), len(groups)), np.nan)
    fig = _figure(max(5.0, 3.5 + 0.9 * len(groups)), max(2.5, 1.2 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    for gene, value in zip(summary.genes, best.genome, strict=True):
        i, j = rows.index(gene.row), groups.index(gene.layers)
        span = gene.high - gene.low
        color[i, j] = (value - gene.low) / span if span else 0.5
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8,
                color="white" if color[i, j] < 0.5 else "black")
    image = ax.imshow(np.ma.masked_invalid(color), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(groups)), [_layer_label(g) for g in groups])
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set(xlabel="layers", title=f"Best genome (trial {best.number})")
    fig.colorbar(image, ax=ax, label="position in [low, high]")
    _save(fig, path)
    return None


def _plot_scores(summary: SearchSummary, path: Path) -> str | None:
    refs = summary.references
    if not refs:
        return "no reference scores"
    fig = _figure(4 + 1.2 * len(refs), 4)
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / len(refs)
    for ax, split, title in zip(axes, ("fitness", "heldout"), ("fitness split", "held-out split"),
                                strict=True):
        entries = _entries(refs, split)
        for k, ref in enumerate(refs):
            scores = getattr(ref, split)
            xs = [i - 0.4 + width * (k + 0.5) for i, e in enumerate(entries) if e in scores]
            values = [scores[e][0] for e in entries if e in scores]
            errors = [_nan(scores[e][1]) for e in entries if e in scores]  # None: no bar
            ax.bar(xs, values, width, yerr=errors, capsize=2, color=f"C{k}",
                   label=f"{ref.name} ({ref.kind})")
        ax.set_xticks(range(len(entries)), entries, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        if not entries:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("score")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8,
               ncols=min(len(refs), 4))
    _save(fig, path)
    return None


def _plot_pareto(summary: SearchSummary, path: Path) -> str | None:
    if not summary.pareto or len(summary.objectives) < 2:
        return "single objective or no Pareto front"
    x_name, y_name = summary.objectives[:2]
    points = {
        t.number: (t.outcome.scores[x_name], t.outcome.scores[y_name])
        for t in completed(summary.trials)
        if x_name in t.outcome.scores and y_name in t.outcome.scores
    }
    front = sorted(points[n] for n in summary.pareto if n in points)
    if not front:
        return "no scores for the Pareto trials"
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot()
    ax.scatter(*zip(*points.values(), strict=True), s=12, alpha=0.3, color="tab:blue",
               label="trial")
    ax.plot(*zip(*front, strict=True), "-o", color="tab:red", ms=5, label="Pareto front")
    ax.set(xlabel=x_name, ylabel=y_name, title="Pareto front")
    ax.legend(fontsize=8)
    _save(fig, path)
    return None
