"""Randomly initialised Llama models of a named shape, saved as Hugging Face directories.

Why: speed and memory depend on a model's shape, not on its training, so a benchmark of a
Llama-2-7B-shaped model needs no 7B download (the GPU machines have no network). The directory
holds the default model's tokenizer, so every command that takes `--model DIR` runs on it;
its answers are noise, its timings are real.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sharedllm.common.errors import InvalidInput
from sharedllm.common.model_loading import resolve_model_path
from sharedllm.common.model_shapes import SHAPES


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def write_random_model(
    target: Path,
    shape: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    init_std: float = 0.02,
    window: int | None = None,
) -> Path:
    """Write a random model of `shape` to `target`; window overrides the shape's context length.

    init_std: the standard deviation of every weight matrix (larger makes a small model's logits
    less flat, which greedy-decoding tests need).
    """
    if shape not in SHAPES:
        raise InvalidInput(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    dims = dict(SHAPES[shape])
    if window is not None:
        dims["max_position_embeddings"] = window
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **dims,
    )
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.no_grad():  # built in `dtype`: a 7B model never exists in fp32
        model = LlamaForCausalLM(config)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, init_std)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
