"""Batch jobs on Celery: compress, summarise and question many long documents asynchronously.

A job is three tasks per document (compress, then summarise, then answer; each sends the next,
stages.py), held by leases that hand a dead worker's document on (leases.py), with its own
record in Redis (jobs.py) that says what every document is doing, what it produced and
why it failed. Workers run the model work either in the worker (embedded) or through the gRPC
services (backends.py). See docs/architecture.md, "Batch jobs".
"""
