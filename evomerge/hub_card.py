"""The model card `evomerge publish` uploads: Hub metadata (the sources' Hub ids as base_model,
tags, the sources' common license), the recipe, the search's results and plots, and the command
that reproduces the merge, on the sections and metadata every card shares (`merge/card.py`, which
also writes the plainer card beside every merge)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from evomerge.folder_checks import PLOTS
from evomerge.merge.card import LICENSE_FIELDS, MERGE_TAGS, hub_id_of, render_card
from evomerge.merge.errors import MergeError, first_line
from evomerge.merge.recipe import Recipe
from evomerge.merge.refs import ModelRef

CARD_FILE = "README.md"
TAGS = [*MERGE_TAGS, "mergekit"]


def resolve_license(sources: list[str], chosen: str | None, warnings: list[str]) -> dict[str, str]:
    """The card's license fields: `chosen` if given, else the sources' common license."""
    if chosen:
        return {"license": chosen}
    known: dict[str, dict[str, str]] = {}
    for source in sources:
        data = source_card_metadata(source, warnings)
        if data is None:
            continue
        if data.get("license"):
            known[source] = {k: str(data[k]) for k in LICENSE_FIELDS if data.get(k)}
        else:
            warnings.append(f"{source}: its model card names no license")
    labels = {source: _license_label(fields) for source, fields in known.items()}
    if len(set(labels.values())) > 1:
        listed = ", ".join(f"{source}: {label}" for source, label in labels.items())
        raise MergeError(
            f"the sources' licenses differ ({listed}); choose the merge's license with --license ID"
        )
    if not known:
        warnings.append("no source's license is known: the card names none; pass --license ID")
        return {}
    return next(iter(known.values()))


def _license_label(fields: dict[str, str]) -> str:
    name = fields.get("license_name")
    return f"other ({name})" if fields["license"] == "other" and name else fields["license"]


def source_card_metadata(source: str, warnings: list[str]) -> dict[str, Any] | None:
    """A source's model card metadata (local README.md or the Hub); None with a warning when it
    cannot be read."""
    ref = ModelRef.parse(source)
    if ref.is_local:
        readme = Path(ref.path) / CARD_FILE
        if not readme.is_file():
            warnings.append(f"{source}: no {CARD_FILE}, so its license is unknown")
            return None
        return card_metadata(readme)
    if ref.hub_id is None:
        warnings.append(f"{source}: neither a local folder nor a Hub id; its license is unknown")
        return None
    try:
        return ModelCard.load(ref.hub_id, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # offline, gone, gated, rate-limited: the license is just unknown
        warnings.append(
            f"{source}: cannot read its model card from the Hub "
            f"({type(exc).__name__}); its license is unknown"
        )
        return None


def card_metadata(readme: Path) -> dict[str, Any]:
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # a hand-edited card with broken front matter
        raise MergeError(f"{readme}: cannot read its front matter ({first_line(exc)})") from None


def model_card(
    repo: str,
    recipe: Recipe,
    recipe_name: str,
    recipe_text: str,
    data: ModelCardData,
    references: list | None,
    plots: list[str],
) -> str:
    from evomerge.merge.methods import get_method

    try:
        method = get_method(recipe.merge_method)
    except MergeError as exc:
        raise MergeError(f"{recipe_name}: {exc}") from None
    before_recipe: list[str] = []
    local = [source for source in recipe.referenced_models() if not hub_id_of(source)]
    if local:
        listed = ", ".join(f"`{source}`" for source in local)
        before_recipe += [
            f"Not on the Hub (local folders where this was merged): {listed}; rebuilding "
            "the merge needs copies of them at those paths.",
            "",
        ]
    found_by_search = references is not None or bool(plots)
    if found_by_search:
        before_recipe += _search_section(references, plots)
    reproduce = [
        "## Reproduce",
        "",
        "Rebuild the weights from the recipe and compare them with this repository's, tensor by "
        "tensor:",
        "",
        "```sh",
        f"evomerge reproduce {repo} --verify",
        "```",
        "",
    ]
    return render_card(
        data,
        repo.split("/")[1],
        method,
        recipe.referenced_models(),
        recipe.base_model,
        f"This is `{recipe_name}` in this repository; `mergekit-yaml` accepts it as well.",
        recipe_text,
        found_by_search,
        before_recipe,
        reproduce,
    )


def _search_section(references: list | None, plots: list[str]) -> list[str]:
    from evomerge.search.report import results_section

    lines = ["## Search", ""]
    if references:
        lines += [
            "Scores of the sources, the uniform merge and the best merge (this model) on "
            "the tasks searched on (fitness) and on held-out tasks, value ± stderr:",
            "",
        ]
        lines += results_section(references)[2:]  # without its "## Results" heading
    lines += [line for name in plots for line in (f"![{PLOTS[name]}]({name})", "")]
    return lines
