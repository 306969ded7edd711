"""The memory plan of recipes/evollm-jp-ps.yaml (a DARE-TIES merge of three Mistral-7B fine-tunes
over Mistral-7B-v0.1, bfloat16) per placement of the sources, and which GPU sizes it fits.

No model is downloaded: four checkpoints with Mistral-7B-v0.1's config and tensor names, shapes
and dtypes are written as sparse files (a real safetensors header, the data a hole), so
merge/memory.py plans from real headers exactly as it would from the downloaded models.

    python benchmarks/memory_plan.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from evomerge.merge.materialize import output_config
from evomerge.merge.memory import plan_memory, size
from evomerge.merge.plan import build_plan
from evomerge.merge.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
MISTRAL_7B = {  # mistralai/Mistral-7B-v0.1 config.json
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
GPUS_GB = [24, 48, 80, 141]
CONTEXT_GIB = 1.0  # CUDA context, allocator slack and fragmentation, set aside on every card


def shapes(config: dict) -> dict[str, list[int]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    out = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }  # fmt: skip
    return out


def sparse_checkpoint(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes(config).items():
        nbytes = 2
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no disk used


def main() -> None:
    recipe = yaml.safe_load((REPO / "recipes" / "evollm-jp-ps.yaml").read_text())["merge"]
    with tempfile.TemporaryDirectory() as tmp:
        names = [recipe["base_model"], *(m["model"] for m in recipe["models"])]
        local = {name: Path(tmp) / name.replace("/", "--") for name in names}
        for folder in local.values():
            sparse_checkpoint(folder, MISTRAL_7B)
        recipe["base_model"] = str(local[recipe["base_model"]])
        for m in recipe["models"]:
            m["model"] = str(local[m["model"]])
            m["parameters"] = {"weight": 0.5, "density": 0.5}  # the search's starting point
        plan = build_plan(parse_recipe(recipe))
        memory = plan_memory(plan, output_config(plan), device="cuda")  # planned for a GPU
        print("recipes/evollm-jp-ps.yaml: " + "; ".join(memory.lines()[1:2]).strip())
        print()
        header = "| sources | device | host | " + " | ".join(f"{g} GB GPU" for g in GPUS_GB) + " |"
        print(header)
        print("|" + " --- |" * (3 + len(GPUS_GB)))
        for placement in ("device", "host"):
            device = memory.device_bytes(placement)
            fits = [
                "fits" if device <= g * 1e9 - CONTEXT_GIB * 2**30 else "no" for g in GPUS_GB
            ]
            row = [placement, size(device), size(memory.host_bytes(placement)), *fits]
            print("| " + " | ".join(row) + " |")
        print(f"\n(a card fits when the device bytes are at most its size less {CONTEXT_GIB:g} GiB "
              "for the CUDA context)")  # fmt: skip


if __name__ == "__main__":
    main()
