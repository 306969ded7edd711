"""The model card `evomerge publish` uploads: Hub metadata (the sources' Hub ids as base_model,
tags, the sources' common license), the recipe, the search's results and plots, and the command
that reproduces the merge. (`merge/card.py` writes the plainer card beside every merge.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from evomerge.folder_checks import PLOTS
from evomerge.merge.errors import MergeError, first_line
from evomerge.merge.recipe import Recipe
from evomerge.merge.refs import ModelRef

CARD_FILE = "README.md"
TAGS = ["merge", "evomerge", "mergekit"]
LICENSE_FIELDS = ("license", "license_name", "license_link")


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


def card_data(
    sources: list[str], license_fields: dict[str, str], existing: dict[str, Any] | None = None
) -> ModelCardData:
    """Card metadata: `existing` (the folder's card) updated with the sources' Hub ids as
    base_model, evomerge's tags, transformers and the license fields."""
    data = {k: v for k, v in (existing or {}).items() if k not in LICENSE_FIELDS}
    hub_ids = list(dict.fromkeys(i for i in map(hub_id_of, sources) if i))
    data.pop("base_model", None)
    data.pop("base_model_relation", None)
    if hub_ids:
        data["base_model"] = hub_ids
        data["base_model_relation"] = "merge"
    data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *TAGS]))
    data["library_name"] = "transformers"
    data.update(license_fields)
    return ModelCardData(**data)


def hub_id_of(source: str) -> str | None:
    return ModelRef.parse(source).hub_id


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
    reference = f" ([paper]({method.reference}))" if method.reference else ""
    lines = [
        f"# {repo.split('/')[1]}",
        "",
        "A merge of pre-trained language models made with "
        "[evomerge](https://github.com/evomerge/evomerge)"
        + (", found by evolutionary search." if references is not None or plots else "."),
        "",
        "## Method",
        "",
        f"**{method.name}**{reference}: {method.description}",
        "",
        "## Models merged",
        "",
        *(_source_line(source, recipe.base_model) for source in recipe.referenced_models()),
        "",
    ]
    local = [source for source in recipe.referenced_models() if not hub_id_of(source)]
    if local:
        listed = ", ".join(f"`{source}`" for source in local)
        lines += [
            f"Not on the Hub (local folders where this was merged): {listed}; rebuilding "
            "the merge needs copies of them at those paths.",
            "",
        ]
    if references is not None or plots:
        lines += _search_section(references, plots)
    lines += [
        "## Recipe",
        "",
        f"This is `{recipe_name}` in this repository; `mergekit-yaml` accepts it as well.",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
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
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _source_line(source: str, base: str | None) -> str:
    hub_id = hub_id_of(source)
    name = f"[{source}](https://huggingface.co/{hub_id})" if hub_id else f"`{source}`"
    return f"- {name}" + (" (base)" if source == base else "")


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
