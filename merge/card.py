"""The model card (README.md with Hub metadata) written beside merged weights."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from evomerge.merge.plan import MergePlan
from evomerge.merge.refs import ModelRef


def hub_ids(plan: MergePlan) -> list[str]:
    """The sources' Hub ids (local directories have none)."""
    ids = [ModelRef.parse(ref).hub_id for ref in plan.source_models()]
    return [i for i in dict.fromkeys(ids) if i]


def model_card(plan: MergePlan, recipe_yaml: str, seed: int, name: str) -> str:
    data = ModelCardData(
        base_model=hub_ids(plan) or None,
        library_name="transformers",
        tags=["merge", "evomerge"],
    )
    method = plan.method
    base = plan.recipe.base_model
    sources = "\n".join(
        f"- `{ref}`" + (" (base)" if ref == base else "") for ref in plan.source_models()
    )
    reference = f" ([paper]({method.reference}))" if method.reference else ""
    stochastic = f" with `--seed {seed}`" if method.stochastic else ""
    body = f"""
# {name}

A merge of pre-trained language models made with [evomerge](https://github.com/evomerge/evomerge).

## Method

**{method.name}**{reference}: {method.description}

## Models merged

{sources}

## Recipe

This is also `evomerge_recipe.yaml` in this repository; `mergekit-yaml` accepts it as well.

```yaml
{recipe_yaml.rstrip()}
```

Rebuild these weights{stochastic}:

```sh
evomerge merge evomerge_recipe.yaml OUT_DIR{f" --seed {seed}" if method.stochastic else ""}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
