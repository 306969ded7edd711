"""The demo family: how it was trained. The weights it gave are shipped in `demo/family/`.

    python demo/build_family.py OUT [--seed N]   # train a family into OUT (a few minutes)
    python demo/build_family.py --check          # retrain, compare with demo/family/MANIFEST.json
    python demo/build_family.py --task-data      # rewrite evals/tasks/demo/data from the generator
    python demo/build_family.py --score FAMILY [MERGED_MODEL ...]

Skills (all answers are decimal numbers, so an evaluator can take the last number generated):

- `skill_a`, addition of two 2-digit numbers: `47+38=` -> `85`.
- `skill_b`, reading Roman numerals 1-1999 (the "second script"): `cccxlvii=` -> `347`.
- `combined`, 2-digit addition written in Roman numerals: `xlvii+xxxviii=` -> `47+38=85`.

Recipe: a 0.66M-parameter Llama with a character-level tokenizer. The base is pre-trained on a
mixture of all three formats and stopped while it only half-knows them; `expert_a` and `expert_b`
continue from it on their own skill only, gently (small learning rate, a few hundred steps, loss
on the completion only). Evaluation items (fitness and held-out splits) never appear in training.

Why the weights are shipped rather than trained on first use: training is seeded and bit-
reproducible on one machine (the same bytes under transformers 5.23 and 5.24, and with 1 or 2
threads), but CPU kernels round differently with the vector width they run at: forcing torch to
AVX2 or to no vector code (`ATEN_CPU_CAPABILITY=avx2|default`) on an AVX-512 machine changes the
logits of the first forward pass in the last bits and the weights after 20 training steps, and a
full build amplifies that into a family whose experts score several points apart. The demo's
numbers therefore rest on these files, not on the machine that runs it; `--check` says whether a
rebuild here gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.evals.greedy import cache_argument
from evomerge.merge.staging import staged_dir

VERSION = 1  # bump whenever the recipe, data or format changes
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DEMO_CHARS = tuple("0123456789cdilmvx+=")
TASKS = ("skill_a", "skill_b", "combined")
MODELS = ("base", "expert_a", "expert_b")
BUILD_THREADS = 1  # a fixed count: kernels may split float reductions by thread count
SHIPPED = Path(__file__).resolve().parent / "family"
MANIFEST = "MANIFEST.json"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    batch_size: int = 64
    warmup_steps: int = 30
    # The base sees all three formats and stops while it only half-knows them (constant rate,
    # as in the probe that tuned these numbers).
    base_steps: int = 700
    base_lr: float = 1e-3
    base_mix: dict[str, float] = field(
        default_factory=lambda: {"skill_a": 0.45, "skill_b": 0.1, "combined": 0.45}
    )
    # Roman numerals are learned much faster than addition. At expert_a's rate, expert_b erased
    # most of the base's addition and its task vector dominated every merge (in a probe).
    expert_steps: int = 250
    expert_lr: dict[str, float] = field(
        default_factory=lambda: {"expert_a": 3e-4, "expert_b": 1e-4}
    )
    eval_items: int = 300  # per task and split


def make_char_tokenizer(
    chars: Sequence[str], model_max_length: int = 128
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0-3 are <pad> <s> </s> <unk>, then `chars` in order.

    A BPE model with no merges splits text into single characters and Fuse joins them back when
    decoding; encoding prepends <s>. Saved with save_pretrained, it loads back through
    AutoTokenizer unchanged for llama and mistral folders (not for qwen2 ones).
    """
    tokens = [*SPECIAL_TOKENS, *chars]
    if len(set(tokens)) != len(tokens) or any(len(c) != 1 for c in chars):
        raise ValueError("chars must be distinct single characters")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


# --- tasks -----------------------------------------------------------------------------------

_ROMAN = (
    (1000, "m"), (900, "cm"), (500, "d"), (400, "cd"), (100, "c"), (90, "xc"),
    (50, "l"), (40, "xl"), (10, "x"), (9, "ix"), (5, "v"), (4, "iv"), (1, "i"),
)  # fmt: skip


def to_roman(n: int) -> str:
    if not 0 < n < 4000:
        raise ValueError(f"no Roman numeral for {n}")
    out = []
    for value, symbol in _ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


def from_roman(text: str) -> int:
    values = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100, "d": 500, "m": 1000}
    digits = [values[c] for c in text]
    total = sum(-d if d < nxt else d for d, nxt in zip(digits, [*digits[1:], 0], strict=True))
    if to_roman(total) != text:
        raise ValueError(f"not a canonical Roman numeral: {text!r}")
    return total


@dataclass(frozen=True)
class Item:
    prompt: str
    target: str  # what the models are trained to generate
    answer: str  # the number that counts: the last number in `target`


def sample_item(task: str, rng: random.Random) -> Item:
    if task == "skill_a":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Item(f"{a}+{b}=", str(a + b), str(a + b))
    if task == "skill_b":
        n = rng.randint(1, 1999)
        return Item(f"{to_roman(n)}=", str(n), str(n))
    if task == "combined":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Item(f"{to_roman(a)}+{to_roman(b)}=", f"{a}+{b}={a + b}", str(a + b))
    raise ValueError(f"unknown task {task!r}")


def make_eval_splits(seed: int, n: int) -> dict[str, dict[str, list[Item]]]:
    """Disjoint `fitness` and `heldout` splits of `n` distinct prompts per task."""
    rng = random.Random(f"eval-{seed}")
    splits = {}
    for task in TASKS:
        items: dict[str, Item] = {}
        for _ in range(100 * n):
            if len(items) == 2 * n:
                break
            item = sample_item(task, rng)
            items.setdefault(item.prompt, item)
        else:
            raise ValueError(f"{task} has too few distinct prompts for two splits of {n}")
        ordered = list(items.values())
        splits[task] = {"fitness": ordered[:n], "heldout": ordered[n:]}
    return splits


def answer_of(text: str) -> str | None:
    """The last number in `text`, as an lm-eval `regex` filter with group_select -1 would."""
    numbers = re.findall(r"\d+", text)
    return numbers[-1] if numbers else None


# --- training --------------------------------------------------------------------------------


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def training_batch(
    tokenizer: PreTrainedTokenizerFast,
    mix: dict[str, float],
    rng: random.Random,
    size: int,
    banned: set[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels; the loss covers the completion and </s>, not the prompt or padding."""
    tasks, weights = list(mix), list(mix.values())
    rows: list[tuple[list[int], list[int]]] = []
    while len(rows) < size:
        item = sample_item(rng.choices(tasks, weights)[0], rng)
        if item.prompt in banned:
            continue
        prompt = [BOS_ID, *_encode(tokenizer, item.prompt)]
        completion = [*_encode(tokenizer, item.target), EOS_ID]
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    length = max(len(ids) for ids, _ in rows)
    inputs = torch.full((size, length), PAD_ID)
    labels = torch.full((size, length), -100)
    for i, (ids, lab) in enumerate(rows):
        inputs[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return inputs, labels


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    mix: dict[str, float],
    steps: int,
    lr: float,
    rng: random.Random,
    banned: set[str],
    recipe: Recipe,
    decay: bool = True,
) -> None:
    """AdamW with linear warm-up, then cosine decay to a tenth of `lr` (or constant)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        return warm * (cosine if decay else 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    for _ in range(steps):
        inputs, labels = training_batch(tokenizer, mix, rng, recipe.batch_size, banned)
        model(input_ids=inputs, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    model.eval()


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions up to </s>. Prompts are batched by length, so no padding is needed."""
    encoded = [tokenizer(p).input_ids for p in prompts]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    outputs: list[str] = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk])
            for i, text in zip(chunk, _greedy(model, tokenizer, ids, max_new_tokens), strict=True):
                outputs[i] = text
    return outputs


def _greedy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, ids: torch.Tensor, steps: int
) -> list[str]:
    out = model(input_ids=ids, use_cache=True)
    cache_name = cache_argument(model) or "past_key_values"
    generated, finished = [], torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(finished, EOS_ID, token)
        generated.append(token)
        finished |= token == EOS_ID
        if finished.all():
            break
        # renamed `cache` in 5.24, where reading past_key_values warns (so no .get default)
        past = out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401
        out = model(input_ids=token[:, None], use_cache=True, **{cache_name: past})
    rows = torch.stack(generated, 1).tolist()
    return [tokenizer.decode(row[: row.index(EOS_ID)] if EOS_ID in row else row) for row in rows]


def accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, items: Sequence[Item]
) -> float:
    texts = greedy_generate(model, tokenizer, [item.prompt for item in items])
    hits = sum(answer_of(text) == item.answer for text, item in zip(texts, items, strict=True))
    return hits / len(items)


def skill_table(
    models_: dict[str, LlamaForCausalLM],
    tokenizer: PreTrainedTokenizerFast,
    items: dict[str, Sequence[Item]],
) -> dict[str, dict[str, float]]:
    """Accuracy per model and task, plus `mixed`: the mean over skill_a and skill_b."""
    table = {}
    for name, model in models_.items():
        row = {task: round(accuracy(model, tokenizer, items[task]), 4) for task in items}
        if "skill_a" in row and "skill_b" in row:
            row["mixed"] = round((row["skill_a"] + row["skill_b"]) / 2, 4)
        table[name] = row
    return table


# --- building --------------------------------------------------------------------------------


@contextmanager
def _fixed_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _new_model(recipe: Recipe, vocab_size: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False
    return model


def _copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    clone = LlamaForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    clone.generation_config = model.generation_config
    return clone


def _write_jsonl(path: Path, items: Sequence[Item]) -> None:
    lines = [
        json.dumps({"prompt": i.prompt, "answer": i.answer, "target": i.target}) for i in items
    ]
    path.write_text("\n".join(lines) + "\n")


def train_family(
    tokenizer: PreTrainedTokenizerFast, banned: set[str], seed: int, recipe: Recipe
) -> dict[str, LlamaForCausalLM]:
    """The base, then each expert continued from it on its own skill. Call under fixed threads."""
    base = _new_model(recipe, len(tokenizer), seed)
    train(base, tokenizer, recipe.base_mix, recipe.base_steps, recipe.base_lr,
          random.Random(f"base-{seed}"), banned, recipe, decay=False)  # fmt: skip
    trained = {"base": base}
    for name, skill in (("expert_a", "skill_a"), ("expert_b", "skill_b")):
        expert = _copy(base)
        train(expert, tokenizer, {skill: 1.0}, recipe.expert_steps, recipe.expert_lr[name],
              random.Random(f"{name}-{seed}"), banned, recipe)  # fmt: skip
        trained[name] = expert
    return trained


def build_demo_family(out_dir: Path, seed: int = 0, recipe: Recipe | None = None) -> Path:
    """Train and write `out_dir/{base,expert_a,expert_b}`, `skills.json` and the manifest.

    The family is written into a hidden sibling and renamed into place when complete, so a
    crashed build leaves nothing half-written."""
    recipe = recipe or Recipe()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SystemExit(f"error: {out_dir} exists; choose a new folder")
    tokenizer = make_char_tokenizer(DEMO_CHARS)
    splits = make_eval_splits(seed, recipe.eval_items)
    banned = {item.prompt for by_split in splits.values() for s in by_split.values() for item in s}
    with torch.random.fork_rng(devices=[]), _fixed_threads(BUILD_THREADS):
        trained = train_family(tokenizer, banned, seed, recipe)
        heldout = {task: splits[task]["heldout"] for task in TASKS}
        table = skill_table(trained, tokenizer, heldout)
    with staged_dir(out_dir) as tmp:
        for name, model in trained.items():
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        skills = {
            "version": VERSION,
            "seed": seed,
            "split": "heldout",
            "items_per_task": recipe.eval_items,
            "metric": "greedy generation; the last number generated equals the answer",
            "accuracy": table,
        }
        (tmp / "skills.json").write_text(json.dumps(skills, indent=2) + "\n")
        write_manifest(tmp, seed)
    return out_dir


def write_task_data(folder: Path, seed: int = 0) -> list[Path]:
    """`{task}_{split}.jsonl` for every task and split (the bundled demo tasks' data), plus
    `mixed_{split}.jsonl`: skill_a and skill_b items interleaved, one of each in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = make_eval_splits(seed, Recipe().eval_items)
    files = {
        f"{task}_{split}.jsonl": items
        for task, by_split in splits.items()
        for split, items in by_split.items()
    }
    for split in ("fitness", "heldout"):
        pairs = zip(splits["skill_a"][split], splits["skill_b"][split], strict=True)
        files[f"mixed_{split}.jsonl"] = [item for pair in pairs for item in pair]
    for name, items in files.items():
        _write_jsonl(folder / name, items)
    return [folder / name for name in files]


# --- the shipped family's manifest -----------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def family_files(folder: Path) -> list[str]:
    """The files that make up a family, relative to it (the manifest itself excluded)."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: Path, seed: int) -> Path:
    """`MANIFEST.json`: the sha256 of every file and what the family was built with."""
    import tokenizers
    import transformers

    manifest = {
        "version": VERSION,
        "seed": seed,
        "built_with": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": BUILD_THREADS,
        },
        "sha256": {name: _sha256(folder / name) for name in family_files(folder)},
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def manifest_differences(folder: Path, manifest_path: Path | None = None) -> list[str]:
    """How `folder`'s files differ from a manifest (default: the folder's own); [] if they match."""
    manifest = json.loads((manifest_path or folder / MANIFEST).read_text())
    recorded: dict[str, str] = manifest["sha256"]
    present = set(family_files(folder))
    problems = [f"{name}: missing" for name in sorted(set(recorded) - present)]
    problems += [f"{name}: not in the manifest" for name in sorted(present - set(recorded))]
    problems += [
        f"{name}: sha256 differs"
        for name in sorted(present & set(recorded))
        if _sha256(folder / name) != recorded[name]
    ]
    return problems


def format_table(table: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(table.values())))
    lines = ["model      " + "".join(f"{c:>10}" for c in columns)]
    for name, row in table.items():
        lines.append(f"{name:<11}" + "".join(f"{row[c]:>10.3f}" for c in columns))
    return "\n".join(lines)


def score(family: Path, model_dirs: Sequence[Path]) -> dict[str, dict[str, float]]:
    """Held-out accuracy of the family's models and of the given (merged) model folders."""
    from transformers import AutoModelForCausalLM

    family = Path(family)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(family / "base")
    seed = json.loads((family / "skills.json").read_text())["seed"]
    splits = make_eval_splits(seed, Recipe().eval_items)
    items = {task: splits[task]["heldout"] for task in TASKS}
    folders = {name: family / name for name in MODELS}
    folders.update({Path(d).name: Path(d) for d in model_dirs})
    with _fixed_threads(BUILD_THREADS):
        models_ = {n: AutoModelForCausalLM.from_pretrained(d).eval() for n, d in folders.items()}
        return skill_table(models_, tokenizer, items)


USAGE = (
    "usage: python demo/build_family.py OUT [--seed N] | --check | --task-data"
    " | --score FAMILY [MODEL ...]"
)


def check_rebuild(seed: int = 0) -> int:
    """Retrain the family in a temporary folder and compare it with the shipped one."""
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build_demo_family(Path(tmp) / "family", seed=seed)
        problems = manifest_differences(rebuilt, SHIPPED / MANIFEST)
        problems = [p for p in problems if not p.startswith(MANIFEST)]
        weights = [p for p in problems if ".safetensors" in p]
        if not weights:
            print(f"the rebuild's weights equal the shipped family's byte for byte ({SHIPPED})")
            for problem in problems:  # e.g. config.json records another transformers_version
                print(f"  (metadata) {problem}")
            return 0
        shipped = json.loads((SHIPPED / "skills.json").read_text())["accuracy"]
        fresh = json.loads((rebuilt / "skills.json").read_text())["accuracy"]
        built_with = json.loads((SHIPPED / MANIFEST).read_text())["built_with"]
        print("the rebuild differs from the shipped family:", *problems, sep="\n  ")
        print(f"shipped (built with {built_with}):\n{format_table(shipped)}")
        print(f"rebuilt here:\n{format_table(fresh)}")
        print("the demo uses the shipped weights; a rebuild elsewhere is expected to differ")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    if args[:1] == ["--score"] and len(args) >= 2:
        print(format_table(score(Path(args[1]), [Path(a) for a in args[2:]])))
        return 0
    if args == ["--check"]:
        return check_rebuild()
    if args == ["--task-data"]:
        folder = REPO / "evals" / "tasks" / "demo" / "data"
        for path in write_task_data(folder):
            print(f"wrote {path}")
        return 0
    if len(args) == 1 and not args[0].startswith("-"):
        seed = 0
    elif len(args) == 3 and args[1] == "--seed" and args[2].isdigit():
        seed = int(args[2])
    else:
        print(USAGE, file=sys.stderr)
        return 2
    out = build_demo_family(Path(args[0]), seed=seed)
    print(format_table(json.loads((out / "skills.json").read_text())["accuracy"]))
    print(f"ready: {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
