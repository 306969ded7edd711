"""How a candidate merge is scored: lm-eval tasks run on a model that stays in memory.

For a search::

    spec = load_fitness_spec("fitness.yaml")          # or parse_fitness_spec(recipe["fitness"])
    suites = prepare_suites(spec)                      # tasks built once, before any model
    evaluator = Evaluator(model, tokenizer, suites)    # one lm-eval HFLM around the model
    for candidate in candidates:
        merger.materialize(model, candidate)           # new weights, same model object
        result = evaluator.score("fitness")            # result.fitness, result.vector
    evaluator.score("heldout")                         # judge the winner on unseen data

Names are imported on first use, so `import evomerge.evals.spec` does not load lm-eval.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalError": "evomerge.evals.errors",
    "EvalResult": "evomerge.evals.results",
    "EvalSettings": "evomerge.evals.spec",
    "Evaluator": "evomerge.evals.evaluator",
    "FitnessSpec": "evomerge.evals.spec",
    "GenerationBudget": "evomerge.evals.spec",
    "Score": "evomerge.evals.results",
    "TaskCatalog": "evomerge.evals.catalog",
    "TaskSuite": "evomerge.evals.suite",
    "answer_matches": "evomerge.evals.extract",
    "extract_number": "evomerge.evals.extract",
    "load_candidate": "evomerge.evals.models",
    "load_fitness_spec": "evomerge.evals.spec",
    "parse_fitness_spec": "evomerge.evals.spec",
    "prepare_suites": "evomerge.evals.suite",
    "suite_from_names": "evomerge.evals.suite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evomerge.evals' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
