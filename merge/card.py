"""Model cards (README.md with Hub metadata): the metadata and the sections every card has.

`merge` writes `model_card`'s plain card beside every merge; `evomerge publish` builds its card
(`evomerge/hub_card.py`: license, search results, plots) from the same `card_data` and
`render_card`, so the two never disagree on the shared parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from evomerge.merge.methods import MergeMethod
from evomerge.merge.plan import MergePlan
from evomerge.merge.refs import ModelRef

MERGE_TAGS = ["merge", "evomerge"]
LICENSE_FIELDS = ("license", "license_name", "license_link")


def hub_id_of(source: str) -> str | None:
    """A source's Hub id, without its revision; None for a local folder."""
    return ModelRef.parse(source).hub_id


def card_data(
    sources: list[str],
    license_fields: dict[str, str],
    existing: dict[str, Any] | None = None,
    tags: list[str] = MERGE_TAGS,
) -> ModelCardData:
    """Card metadata: `existing` (a folder's card) updated with the sources' Hub ids as
    base_model, `tags`, transformers and the license fields."""
    from evomerge.merge.lora import split_lora

    data = {k: v for k, v in (existing or {}).items() if k not in LICENSE_FIELDS}
    parts = [part for source in sources for part in split_lora(source) if part]  # base+adapter
    hub_ids = list(dict.fromkeys(i for i in map(hub_id_of, parts) if i))
    data.pop("base_model", None)
    data.pop("base_model_relation", None)
    if hub_ids:
        data["base_model"] = hub_ids
        data["base_model_relation"] = "merge"
    data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *tags]))
    data["library_name"] = "transformers"
    data.update(license_fields)
    return ModelCardData(**data)


def render_card(
    data: ModelCardData,
    title: str,
    method: MergeMethod,
    sources: list[str],
    base: str | None,
    recipe_note: str,
    recipe_text: str,
    found_by_search: bool = False,
    before_recipe: Sequence[str] = (),
    after_recipe: Sequence[str] = (),
) -> str:
    """A card: title, method, the models merged (Hub ones linked), `before_recipe`, the recipe
    YAML under `recipe_note`, then `after_recipe` (markdown lines)."""
    reference = f" ([paper]({method.reference}))" if method.reference else ""
    lines = [
        f"# {title}",
        "",
        "A merge of pre-trained language models made with "
        "[evomerge](https://github.com/evomerge/evomerge)"
        + (", found by evolutionary search." if found_by_search else "."),
        "",
        "## Method",
        "",
        f"**{method.name}**{reference}: {method.description}",
        "",
        "## Models merged",
        "",
        *(_source_line(source, base) for source in sources),
        "",
        *before_recipe,
        "## Recipe",
        "",
        recipe_note,
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
        *after_recipe,
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _source_line(source: str, base: str | None) -> str:
    hub_id = hub_id_of(source)
    name = f"[{source}](https://huggingface.co/{hub_id})" if hub_id else f"`{source}`"
    return f"- {name}" + (" (base)" if source == base else "")


def model_card(plan: MergePlan, recipe_yaml: str, seed: int, name: str) -> str:
    """The card written beside a merge's weights, with the command that rebuilds them."""
    seed_flag = f" --seed {seed}" if plan.method.stochastic else ""
    rebuild = [
        f"Rebuild these weights{f' with `{seed_flag.strip()}`' if seed_flag else ''}:",
        "",
        "```sh",
        f"evomerge merge evomerge_recipe.yaml OUT_DIR{seed_flag}",
        "```",
        "",
    ]
    return render_card(
        card_data(plan.source_models(), {}),
        name,
        plan.method,
        plan.source_models(),
        plan.recipe.base_model,
        "This is also `evomerge_recipe.yaml` in this repository; "
        "`mergekit-yaml` accepts it as well.",
        recipe_yaml,
        after_recipe=rebuild,
    )
