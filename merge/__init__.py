"""What a merge is and how it is made: recipes, methods, streaming I/O, materialization.

- `recipe.py`, `parameters.py`, `refs.py`: the mergekit recipe schema, per-layer parameter
  resolution, model references (local folders, Hub ids); `lenient.py`: what mergekit ignores
  in a recipe (warnings, or errors with --strict); `lora.py`: `base+adapter` references.
- `methods/`: the merge methods as data plus pure tensor functions.
- `weights.py`: the one reader of a model folder's safetensors headers and shard index;
  `checkpoint.py` reads tensors through it.
- `plan.py`, `compute.py`: everything planned from headers before a tensor is read, then each
  output tensor computed; `vocab.py` and `chat_template.py` for tokenizers.
- `materialize.py` (file merges), `resident.py` (in-memory merges for search), `stacking.py`
  (layer stacking), `writer.py` (streamed shards), `staging.py` (build beside, rename into
  place), `card.py` (model-card metadata and sections, shared with `evomerge publish`).
"""
