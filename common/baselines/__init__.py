"""Baselines the evaluation compares SharedLLM with, built over the engine's own layer loop."""
