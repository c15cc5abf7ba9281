"""`sharedllm model random`: random models of a named shape for benchmarks, loadable like any model."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sharedllm.cli import main
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.random_model import SHAPES


def test_llama_2_7b_shape_has_7b_parameters():
    config = LlamaConfig(vocab_size=49152, **SHAPES["llama-2-7b"])
    with torch.device("meta"):  # no memory: only the parameter count is wanted
        model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert 6.7e9 < n < 7.0e9  # Llama-2-7B has 6.74e9 with its 32,000-token vocabulary


def test_random_model_command_writes_a_model_every_command_can_load(tmp_path, capsys):
    out = tmp_path / "random"
    assert main(["model", "random", "--shape", "tiny", "--out", str(out), "--dtype", "bfloat16"]) == 0
    engine = Engine.load(str(out), device="cpu", dtype=torch.float32)
    assert engine.body.n_layers == SHAPES["tiny"]["num_hidden_layers"] and not engine.trained
    tree = engine.compress(engine.tokenize_document("A random model still compresses text. " * 40)).tree
    events = list(engine.generate(tree, "Anything?", SamplingParams(max_new_tokens=3)))
    assert events[-1].completion_tokens <= 3
    assert main(["model", "random", "--shape", "tiny", "--out", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
