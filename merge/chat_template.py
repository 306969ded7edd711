"""`chat_template:` in a recipe: a built-in name, `auto` (the sources' most common), or Jinja."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from evomerge.merge.errors import MergeError
from evomerge.merge.recipe import Warn, print_warning, read_json_object, read_text

# The built-in templates render exactly what mergekit 0.1.5's files of the same names render under
# transformers (trim_blocks, lstrip_blocks), whitespace quirks included, so a merged model chats
# the same whichever tool wrote it (tests/test_merge_engine.py renders both).
BUILTIN = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{{ (bos_token if loop.first else '') + "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ ((systems | last).content | trim if systems else '') + '\\n\\n' }}"
        "{% set headers = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
        "'user_context': '### Input:\\n'} %}"
        "{% for message in messages %}{% if message['role'] in headers %}"
        "{{ headers[message['role']] + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}"
        "{% endif %}{{ bos_token }}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must "
        "alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ ' [INST] ' + (system_message + '\\n\\n' if "
        "loop.first and system_message is defined else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the "
        "exception of an initial optional system message!') }}{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' + message['role'] + '|]' + message['content'] + '\\n' }}"
        "{{ '        \\n\\n' if message['role'] == 'user' else '        [|endofturn|]\\n\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"
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
