"""Scoring of the gsm8k_ja task (lm-eval loads this file by path)."""

from __future__ import annotations

from evomerge.evals.extract import answer_matches


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Right when the last number of the generation equals the answer (1,000 == 1000)."""
    return {"exact_match": float(answer_matches(results[0], str(doc["answer_number"])))}
