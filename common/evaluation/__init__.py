"""Evaluation (docs/evaluation.md): perplexity against context length, needle and passkey retrieval."""
