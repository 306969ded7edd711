"""How a candidate merge is scored (lm-eval harness on in-memory models)."""
