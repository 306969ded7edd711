"""How candidate merges are proposed (search spaces, optimizers, the search loop)."""
