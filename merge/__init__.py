"""What a merge is and how it is made: recipes, methods, streaming I/O, materialization."""
