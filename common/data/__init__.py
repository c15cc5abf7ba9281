"""Training and evaluation data: corpora from installed packages, token shards, synthetic tasks."""
