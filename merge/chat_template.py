"""`chat_template:` in a recipe: a built-in name, `auto` (the sources' most common), or Jinja."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from evomerge.merge.errors import MergeError
from evomerge.merge.recipe import Warn, print_warning, read_json_object, read_text

BUILTIN = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% else %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
    ),
}


def model_chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja, "a chat template")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            template = read_json_object(path, "the tokenizer config").get("chat_template")
            if isinstance(template, str):
                return template
    return None


def resolve_chat_template(
    setting: str, model_dirs: list[Path], warn: Warn = print_warning
) -> str | None:
    """The template to write; None for `auto` when no source has one (mergekit then merges
    without one too, and so does evomerge, saying so). `auto` takes the sources' most common
    template, stripped, as mergekit does."""
    if setting == "auto":
        templates = [t.strip() for t in map(model_chat_template, model_dirs) if t]
        if not templates:
            warn("chat_template: auto found no chat template in any source model; merging "
                 "without one (as mergekit does)")  # fmt: skip
            return None
        return Counter(templates).most_common(1)[0][0]
    if setting in BUILTIN:
        return BUILTIN[setting]
    if "{" in setting:
        return setting
    names = ", ".join(["auto", *BUILTIN])
    raise MergeError(f"chat_template: {setting!r} is not one of {names} nor a Jinja template")
