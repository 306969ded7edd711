"""How candidate merges are proposed (search spaces, optimizers, the search loop).

- `config.py`: the search recipe; `space.py`, `dfs.py`: genome <-> recipe or layer path.
- `optimizers.py`: Nevergrad and Optuna proposers; `loop.py`: the loop, its end and the PS+DFS
  stages; `journal.py`: the trials in an Optuna study; `lock.py`: one search per output folder.
- `executor.py`, `ray_executor.py`: candidates in, outcomes out; `report.py`, `records.py`:
  what a search produced; `command.py`: the CLI glue.
"""
