"""A tiny, randomly initialised Llama with the default model's tokenizer, for fast tests.

It is saved as a real Hugging Face directory so the tests go through the same loading path
as users do; only the weights are small and random.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common.model_loading import resolve_model_path


def make_tiny_model_dir(target: Path, seed: int = 0, window: int = 1024) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default weights make the random model's logits less flat, so argmax ties
    # (which would make greedy comparisons meaningless) do not happen.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
