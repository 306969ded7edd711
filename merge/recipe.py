"""The merge recipe: mergekit's YAML format, read and written with pydantic.

A recipe names its inputs either as `models` (every layer of each model) or as `slices`
(layer ranges of sources, stacked in order). `parameters` may appear at the top level, on
a slice and on a source; the most specific one wins (see `parameters.py`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.merge.errors import MergeError, first_line

Warn = Callable[[str], None]

Scalar = StrictBool | StrictInt | StrictFloat | StrictStr
ScalarOrGradient = Scalar | list[Scalar]


class ConditionalSetting(BaseModel):
    """`{filter: self_attn, value: [0, 0.5, 1]}`: applies to tensors whose name contains filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: ScalarOrGradient


Setting = ScalarOrGradient | ConditionalSetting | list[ConditionalSetting]
Parameters = dict[str, Setting]


def _model_ref(value: Any) -> Any:
    """Accept mergekit's reference forms and normalize them to 'path' or 'path@revision'."""
    if isinstance(value, dict):
        model = _path_form(value.get("model", value))
        lora = value.get("lora")
        return f"{model}+{_path_form(lora)}" if lora else model
    return value


def _path_form(value: Any) -> Any:
    """mergekit's `{path, revision}` mapping as 'path' or 'path@revision'."""
    if not isinstance(value, dict):
        return value
    path, revision = value.get("path"), value.get("revision")
    if not isinstance(path, str):
        raise ValueError("a model reference needs a 'path'")
    return f"{path}@{revision}" if revision else path


ModelRef = Annotated[StrictStr, BeforeValidator(_model_ref)]

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _dtype(value: Any) -> Any:
    if value is None:
        return None
    if value not in _DTYPES:
        raise ValueError(f"{value!r} is not a dtype; use one of float32, float16, bfloat16")
    return _DTYPES[value]


DType = Annotated[str | None, BeforeValidator(_dtype)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSlice(_Strict):
    model: ModelRef
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"{list(value)} must be [start, end) with 0 <= start < end")
        return value


class InputModel(_Strict):
    model: ModelRef
    parameters: Parameters | None = None


class OutputSlice(_Strict):
    sources: list[SourceSlice]
    base_model: ModelRef | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, value: list[SourceSlice]) -> list[SourceSlice]:
        if not value:
            raise ValueError("a slice needs at least one source")
        return value


class ModelTokenSource(_Strict):
    """A token's embedding copied from a row of one model: by id, or by that model's token."""

    kind: Literal["model_token"]
    model: ModelRef
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """How one output token's embedding rows are made where a model lacks the token (or, with
    `force`, in every model): zeros, a model's row for the token, or a named row."""

    source: ModelTokenSource | ZeroSource | ModelRef
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _by_kind(cls, value: Any) -> Any:
        """A mapping with `kind` is a row source (checked here, for a clear message); anything
        else is a model reference."""
        if not (isinstance(value, dict) and "kind" in value):
            return value
        kinds = {"zero": ZeroSource, "model_token": ModelTokenSource}
        if value["kind"] not in kinds:
            raise ValueError(f"kind {value['kind']!r} is not one of zero, model_token")
        try:
            return kinds[value["kind"]].model_validate(value)
        except ValidationError as exc:
            raise ValueError(f"{value['kind']}: {describe_validation_error(exc)}") from None


class TokenizerConfig(_Strict):
    """mergekit's `tokenizer:` block (its source defaults to union, as in mergekit)."""

    source: Literal["union", "base"] | ModelRef = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(_Strict):
    """A mergekit-compatible merge recipe."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: ModelRef | None = None
    parameters: Parameters | None = None
    dtype: DType = None
    out_dtype: DType = None
    tokenizer_source: Literal["union", "base"] | ModelRef | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    # How TIES-style trimming picks among entries of equal magnitude at the density cut (an
    # evomerge key; mergekit ignores it): None or "mergekit" sorts as mergekit 0.1.5 does, so
    # the tensors equal mergekit-yaml's on the same torch build; "fast" finds the cut in linear
    # time and takes equal entries in index order (merge/methods/select.py).
    selection: Literal["mergekit", "fast"] | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> Recipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices' (and not an empty list)")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    @property
    def effective_tokenizer_source(self) -> str | None:
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, in first-mention order (base model first)."""
        refs: list[str] = [self.base_model] if self.base_model else []
        for model in self.models or []:
            refs.append(model.model)
        for out_slice in self.slices or []:
            if out_slice.base_model:
                refs.append(out_slice.base_model)
            refs.extend(source.model for source in out_slice.sources)
        source = self.effective_tokenizer_source
        if source not in (None, "union", "base"):
            refs.append(source)
        return list(dict.fromkeys(refs))

    def to_yaml(self, *, mark_local: bool = False) -> str:
        """The recipe as mergekit YAML; with `mark_local`, local model paths are written as
        `./path` (see `refs.mark_local`) for files that other tools will read."""
        data = self.model_dump(mode="json", exclude_none=True)
        if mark_local:
            data = _mark_local(data, set(self.referenced_models()))
        return dump_yaml(data)

    @classmethod
    def from_yaml(
        cls, text: str, origin: str = "recipe", *, strict: bool = False, warn: Warn | None = None
    ) -> Recipe:
        data = parse_yaml(text, origin)
        if not isinstance(data, dict):
            raise MergeError(
                f"{origin}: expected a YAML mapping with merge_method and models/slices"
            )
        return parse_recipe(data, origin, strict=strict, warn=warn)


MAX_YAML_NODES = 1_000_000  # the document's size with every alias expanded


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects) that refuses alias bombs ("billion laughs"):
    nested aliases cost nothing to load but expand exponentially once the data is walked, and
    would run until killed. The expanded size is counted on the node graph, in linear time."""

    def compose_document(self):  # type: ignore[no-untyped-def]
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:
            if id(n) not in sizes:
                sizes[id(n)] = 0  # a cycle counts once
                if isinstance(n, yaml.SequenceNode):
                    total = 1 + sum(size(child) for child in n.value)
                elif isinstance(n, yaml.MappingNode):
                    total = 1 + sum(size(k) + size(v) for k, v in n.value)
                else:
                    total = 1
                sizes[id(n)] = total
            return sizes[id(n)]

        if node is not None and size(node) > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"the document expands to {size(node):,} nodes through its aliases (*name), "
                f"more than {MAX_YAML_NODES:,}: an alias bomb?"
            )
        return node


def parse_yaml(text: str, origin: str, error: type[MergeError] = MergeError) -> Any:
    """YAML text to data (safe: no Python objects, no alias bombs); a syntax error becomes one
    line naming the file and line."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{origin}: malformed YAML{where}: {problem}") from None


def parse_recipe(
    data: dict[str, Any], origin: str = "recipe", *, strict: bool = False, warn: Warn | None = None
) -> Recipe:
    """A recipe from parsed YAML, read as mergekit reads it: keys and parameters mergekit ignores
    are dropped with a warning (`warn`, default: a `warning: ...` line on stderr), or are an
    error with `strict` (merge/lenient.py)."""
    from evomerge.merge.lenient import accept_mergekit_recipe

    if isinstance(data, dict):
        data = accept_mergekit_recipe(data, origin, strict, warn or print_warning)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise MergeError(f"{origin}: {describe_validation_error(exc)}") from None


def read_text(path: Path, what: str, error: type[MergeError] = MergeError) -> str:
    """A file's text; an unreadable file is one line naming it and `what` it should hold."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: {what} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None


def read_json_object(path: Path, what: str, error: type[MergeError] = MergeError) -> dict:
    """A JSON file that must hold an object, or a one-line error naming it."""
    try:
        data = json.loads(read_text(path, what, error))
    except ValueError as exc:
        raise error(f"{path}: {what} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object, not a {type(data).__name__}")
    return data


def load_recipe(path: str | Path, *, strict: bool = False, warn: Warn | None = None) -> Recipe:
    path = Path(path)
    return Recipe.from_yaml(read_text(path, "recipe"), origin=str(path), strict=strict, warn=warn)


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def describe_validation_error(
    exc: ValidationError, tagged: dict[str, set[str]] | None = None
) -> str:
    """The first pydantic error as 'field.path: message', counting the rest. `tagged` names
    fields holding a discriminated union ({field: its tag values}): the tag pydantic puts in
    the path after such a field is dropped, as it is not a key the user wrote."""
    errors = exc.errors()
    # Union members each report a failure; prefer the most specific (deepest) one.
    first = max(errors, key=lambda e: (e["type"] != "literal_error", len(e["loc"])))
    parts = list(first["loc"])
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in (tagged or {}).get(str(parts[i - 1]), ()):
            del parts[i]
    loc = ".".join(str(p) for p in parts if not _is_union_tag(p))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see mergekit's recipe format)"
    return f"{loc}: {message}" if loc else message


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part.startswith(("function-", "literal[", "list[", "tuple["))
        or part in {"str", "int", "float", "bool", "ConditionalSetting", "TokenizerConfig"}
    )


class _YamlDumper(yaml.SafeDumper):
    """Writes numeric lists (gradients, layer ranges) in flow style, like mergekit."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(e, int | float) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_YamlDumper.add_representer(list, _represent_list)
_YamlDumper.add_representer(tuple, _represent_list)


def _mark_local(data: Any, models: set[str]) -> Any:
    from evomerge.merge.refs import MODEL_KEYS, mark_local

    if isinstance(data, list):
        return [_mark_local(item, models) for item in data]
    if not isinstance(data, dict):
        return data
    return {
        key: mark_local(value)
        if key in MODEL_KEYS and isinstance(value, str) and value in models
        else _mark_local(value, models)
        for key, value in data.items()
    }


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_YamlDumper, sort_keys=False)
