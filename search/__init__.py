"""How candidate merges are proposed (search spaces, optimizers, the search loop).

- `config.py`: the search recipe; `space.py`, `dfs.py`: genome <-> recipe or layer path, and the
  executor each space's candidates need.
- `optimizers.py`: the `Optimizer` protocol and its Nevergrad and Optuna implementations.
- `loop.py`: `Search`, the loop and its end (references, outputs); `stages.py`: PS+DFS as two
  searches; `journal.py`: the trials in an Optuna study; `lock.py`: one search per output folder.
- `executor.py`, `ray_executor.py`: candidates in, outcomes out (sources scored there too);
  `report.py`, `records.py`: what a search produced; `command.py`: the CLI glue.
"""
