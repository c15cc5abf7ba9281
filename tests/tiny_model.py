"""A tiny, randomly initialised Llama with the default model's tokenizer, for fast tests.

It is saved as a real Hugging Face directory so the tests go through the same loading path
as users do; only the weights are small and random.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sharedllm.common.config import TreeConfig
from sharedllm.common.random_model import write_random_model

TINY_TREE = TreeConfig(n_layers=2, chunk_size=64, depth=2, pool_size=4)  # the tests' tree: many chunks from little text


def make_tiny_model_dir(target: Path, seed: int = 0, window: int = 1024) -> Path:
    # Larger-than-default weights make the random model's logits less flat, so argmax ties
    # (which would make greedy comparisons meaningless) do not happen.
    return write_random_model(target, "tiny", dtype=torch.float32, seed=seed, init_std=0.1, window=window)
