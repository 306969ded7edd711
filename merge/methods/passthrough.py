"""Passthrough: copy one input, optionally scaled (layer stacking / frankenmerges)."""

from __future__ import annotations

from evomerge.merge.methods import MergeMethod, ParamSpec, Scope, register


def _passthrough(group, shared, per_input, generators):
    scale = per_input[0]["scale"]
    tensor = group.tensors[0]
    return tensor if scale is None else tensor * scale


register(
    MergeMethod(
        name="passthrough",
        params=(ParamSpec("scale", float | None, Scope.INPUT, None),),
        merge=_passthrough,
        max_inputs=1,
        description="Passthrough: tensors copied unchanged from one source per slice.",
    )
)
