"""The named shapes of `sharedllm model random`, for benchmarks of a model's size without its weights.

Apart from random_model.py, which loads torch and transformers to build the model, so that the
command's parser lists the shapes without loading either.
"""

from __future__ import annotations

# Published architecture hyper-parameters; the vocabulary is the default tokenizer's.
SHAPES: dict[str, dict[str, int | bool]] = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}
