"""Summaries of long documents: one pipeline (pipeline.py) for `sharedllm summarize`, batch jobs
and `sharedllm eval summary`."""
