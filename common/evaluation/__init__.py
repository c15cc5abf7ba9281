"""Evaluation (evaluation.md): perplexity against context length, needle and passkey retrieval."""
