"""The engine on a tiny random Llama: exactness of the untrained adapter, tree shapes,
retrieval, chunk positions, sampling and adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sharedllm.common.config import ConfigError, TreeConfig, node_index
from sharedllm.common.engine.adapter import InjectionAdapter, read_adapter_config
from sharedllm.common.engine.compressor import Compressor, node_spans, pooling_plan
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.llama import LlamaBody
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import Finished, TokenDelta
from sharedllm.common.engine.retrieval import select_nodes
from sharedllm.common.errors import InvalidInput, ModelUnavailable
from sharedllm.common.kernels.reference import rotate_half
from sharedllm.common.model_loading import load_model
from sharedllm.common.shipped import SHIPPED_ADAPTERS, adapter_file, default_adapter_path, shipped_adapter_names

SMALL = TreeConfig(n_layers=2, chunk_size=64, depth=3, pool_size=4)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def engine_for(loaded, config: TreeConfig = SMALL) -> Engine:
    body = LlamaBody(loaded.model)
    return Engine(loaded, InjectionAdapter.initialise(body, config))


def random_ids(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("encoding", ["single_pass", "per_node"])
def test_untrained_adapter_is_exactly_the_base_model(tiny, encoding):
    engine = engine_for(tiny, TreeConfig(n_layers=2, chunk_size=64, depth=2, pool_size=4, encoding=encoding))
    prompt = random_ids(40, seed=1)
    reference = tiny.model(torch.tensor([prompt])).logits[0]
    tree = engine.compress(random_ids(300, seed=2)).tree
    no_context = engine.logits(prompt)
    with_context = engine.logits(prompt, tree, query_ids=prompt[:10])
    assert (no_context - reference).abs().max().item() <= 1e-5
    assert (with_context - reference).abs().max().item() <= 1e-5


def test_trained_adapter_reads_the_context(tiny):
    engine = engine_for(tiny)
    for block in engine.adapter.blocks:
        torch.nn.init.normal_(block.o_proj.weight, std=0.05)
    prompt = random_ids(20, seed=3)
    a = engine.logits(prompt, engine.compress(random_ids(200, seed=4)).tree)
    b = engine.logits(prompt, engine.compress(random_ids(200, seed=5)).tree)
    assert (a - b).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    ("chunk", "depth", "pool", "n_tokens"),
    [(64, 3, 4, 64 * 3 + 17), (32, 2, 8, 32 * 2 + 1), (16, 3, 32, 16), (128, 1, 32, 130), (64, 4, 2, 5)],
)
@pytest.mark.parametrize("encoding", ["single_pass", "per_node"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_tree_shapes_and_counts(tiny, chunk, depth, pool, n_tokens, encoding, pooling):
    cfg = TreeConfig(n_layers=2, chunk_size=chunk, depth=depth, pool_size=pool, encoding=encoding, pooling=pooling)
    engine = engine_for(tiny, cfg)
    tree = engine.compress(random_ids(n_tokens)).tree
    n_chunks = -(-n_tokens // chunk)
    assert tree.chunk_lengths == tuple([chunk] * (n_chunks - 1) + [n_tokens - chunk * (n_chunks - 1)])
    assert sum(tree.chunk_lengths) == n_tokens  # nothing dropped
    body = engine.body
    assert tuple(tree.keys.shape) == (2, n_chunks, cfg.nodes_per_chunk, pool, body.n_kv, body.head_dim)
    assert tree.retrieval_keys.shape == (n_chunks, cfg.nodes_per_chunk, body.hidden)
    for c, length in enumerate(tree.chunk_lengths):
        for level in range(1, depth + 1):
            for p in range(2**level):
                node_len = int(node_spans(length, depth)[node_index(level, p)].diff())
                count = int(tree.counts[c, node_index(level, p)])
                assert count == min(node_len, pool)
                # Slots past the count are zero: nothing stale can leak into attention.
                assert tree.keys[:, c, node_index(level, p), count:].abs().sum() == 0
        # A level's nodes partition the chunk.
        spans = node_spans(length, depth)
        for level in range(1, depth + 1):
            lv = spans[node_index(level, 0) : node_index(level, 0) + 2**level]
            assert lv[0, 0] == 0 and lv[-1, 1] == length and torch.equal(lv[1:, 0], lv[:-1, 1])


def test_single_pass_keeps_last_entry_of_each_block(tiny):
    cfg = TreeConfig(n_layers=2, chunk_size=64, depth=1, pool_size=4)
    engine = engine_for(tiny, cfg)
    ids = random_ids(64)
    tree = engine.compress(ids).tree
    kv, _ = engine.compressor.encode(torch.tensor([ids]))
    # Level 1, left half covers tokens 0..31 in 4 blocks of 8: last tokens 7, 15, 23, 31.
    expected = kv[0, 0, :, [7, 15, 23, 31]].permute(1, 0, 2)
    assert torch.equal(tree.keys[0, 0, node_index(1, 0)], expected)


def test_pooling_plan_short_node_keeps_everything():
    start, end, count = pooling_plan(torch.tensor([[10, 13]]), 8)
    assert count.tolist() == [3]
    assert start[0, :3].tolist() == [10, 11, 12] and end[0, :3].tolist() == [11, 12, 13]
    assert (start[0, 3:] == end[0, 3:]).all()


def test_split_noise_moves_splits_but_partitions():
    g = torch.Generator().manual_seed(0)
    noisy = node_spans(1024, 3, g)
    assert not torch.equal(noisy, node_spans(1024, 3))
    assert noisy[0, 0] == 0 and noisy[1, 1] == 1024 and noisy[0, 1] == noisy[1, 0]


def test_retrieval_uses_each_chunks_own_children():
    depth, hidden = 3, 8
    n_nodes = 2 ** (depth + 1) - 2
    basis = torch.eye(hidden)
    keys = torch.zeros(3, n_nodes, hidden)
    keys[:] = basis[7]  # every node points away from the query...
    query = basis[0]
    # ...except the path each chunk should follow, which differs per chunk.
    paths = {0: [0, 0, 0], 1: [1, 2, 5], 2: [0, 1, 3]}
    for chunk, path in paths.items():
        for level, pos in enumerate(path, start=1):
            keys[chunk, node_index(level, pos)] = basis[0]
    sel = select_nodes(keys, query, depth)
    assert sel.shape == (3, depth + 1)
    for chunk, path in paths.items():
        expected = []
        for level, pos in enumerate(path, start=1):
            sibling = pos ^ 1
            if level < depth:
                expected.append(node_index(level, sibling))
            else:
                expected += [node_index(level, pos), node_index(level, sibling)]
        assert sorted(sel[chunk].tolist()) == sorted(expected), chunk


def test_retrieval_off_expands_the_most_recent_child():
    sel = select_nodes(torch.randn(2, 14, 8), None, 3)
    # Kept left halves at levels 1 and 2, and the last two leaves, in document order.
    assert sel.tolist() == [[0, 4, 12, 13]] * 2


def test_chunk_positions_applied_exactly_once(tiny):
    engine = engine_for(tiny, TreeConfig(n_layers=2, chunk_size=32, depth=1, pool_size=4))
    tree = engine.compress(random_ids(32 * 3, seed=7)).tree
    # Make every chunk hold the same stored keys so only the chunk rotation differs.
    tree.keys[:] = tree.keys[:, :1].clone()
    injection, _ = engine.decoder.prepare(tree, None)
    per_chunk = 2 * 4  # D + 1 = 2 nodes of 4 entries
    cos, sin = engine.body.rope(torch.arange(3).unsqueeze(0))
    stored = tree.keys[0, 0, [0, 1]]  # [2 nodes, P, kv, Dh] of layer 0
    stored = stored.permute(2, 0, 1, 3).reshape(engine.body.n_kv, per_chunk, -1)
    for j in range(3):
        got = injection.keys[0, :, j * per_chunk : (j + 1) * per_chunk]
        want = stored * cos[0, j] + rotate_half(stored) * sin[0, j]
        assert torch.allclose(got, want, atol=1e-6), j
    assert not torch.allclose(injection.keys[0, :, per_chunk : 2 * per_chunk], stored, atol=1e-3)


def collect(events) -> tuple[list[int], Finished]:
    tokens, finished = [], None
    for event in events:
        if isinstance(event, TokenDelta):
            if event.token_id is not None:
                tokens.append(event.token_id)
        else:
            finished = event
    return tokens, finished


def test_greedy_equals_hf_generate_without_context(tiny):
    engine = engine_for(tiny)
    prompt = engine.prompt_ids("Tell me a story about a cat.")
    tokens, finished = collect(engine.generate(None, "Tell me a story about a cat.", SamplingParams(max_new_tokens=24)))
    hf = tiny.model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    hf_tokens = hf[0, len(prompt) :].tolist()
    n = len(tokens)
    assert n > 0 and tokens == hf_tokens[:n]
    assert finished.completion_tokens == n


def test_same_seed_same_output(tiny):
    engine = engine_for(tiny)
    tree = engine.compress(random_ids(200)).tree
    params = SamplingParams(
        max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, seed=123, grounding="off", loop_guard=0
    )
    a, _ = collect(engine.generate(tree, "Question?", params))
    b, _ = collect(engine.generate(tree, "Question?", params))
    c, _ = collect(engine.generate(tree, "Question?", SamplingParams(**{**params.__dict__, "seed": 124})))
    assert a == b and a != c


def test_repetition_penalty_and_stop_strings(tiny):
    engine = engine_for(tiny)
    tokens, finished = collect(engine.generate(None, "Hi", SamplingParams(max_new_tokens=12)))
    text = engine.decode_text(tokens)
    assert finished.reason == "length"
    stop = text[3:6]
    _, stopped = collect(engine.generate(None, "Hi", SamplingParams(max_new_tokens=12, stop=(stop,))))
    assert stopped.reason == "stop" and stopped.text == text[: text.find(stop)]
    penalised, _ = collect(engine.generate(None, "Hi", SamplingParams(max_new_tokens=12, repetition_penalty=5.0)))
    assert len(set(penalised)) >= len(set(tokens))


@pytest.mark.parametrize("temperature", [1e-38, 5e-324])
def test_a_vanishing_temperature_samples_the_greedy_answer(tiny, temperature):
    """Accepted by validation, so it must work: before, logits / 5e-324 overflowed to NaN
    probabilities and the request ended in INTERNAL (found by a fuzzer)."""
    engine = engine_for(tiny)
    greedy, _ = collect(engine.generate(None, "Hi", SamplingParams(max_new_tokens=8)))
    cold, _ = collect(engine.generate(None, "Hi", SamplingParams(max_new_tokens=8, temperature=temperature, seed=1)))
    assert cold == greedy


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=0),
        SamplingParams(max_new_tokens=10**9),
        SamplingParams(temperature=float("nan")),
        SamplingParams(temperature=-1),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(min_p=1.0),
        SamplingParams(repetition_penalty=0.0),
        SamplingParams(repetition_penalty=1e-40, temperature=1.0),  # found by a fuzzer: INTERNAL before
        SamplingParams(stop=tuple(str(i) for i in range(17))),
        SamplingParams(stop=("",)),
    ],
)
def test_bad_sampling_params_are_refused(tiny, params):
    engine = engine_for(tiny)
    with pytest.raises(InvalidInput):
        list(engine.generate(None, "Hi", params))


def test_document_and_prompt_limits(tiny):
    engine = engine_for(tiny)
    with pytest.raises(InvalidInput, match="empty"):
        engine.tokenize_document("   \n")
    with pytest.raises(InvalidInput, match="binary"):
        engine.tokenize_document("abc\x00def")
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        engine.check_token_ids([1, 2, 10**7])
    engine.limits = type(engine.limits)(max_document_tokens=10)
    with pytest.raises(InvalidInput, match="limit is 10"):
        engine.tokenize_document("word " * 50)
    with pytest.raises(InvalidInput, match="window"):
        list(engine.generate(None, "Hi", SamplingParams(max_new_tokens=engine.window)))


def test_adapter_round_trip_and_wrong_base_refused(tiny, tmp_path):
    engine = engine_for(tiny)
    for block in engine.adapter.blocks:
        torch.nn.init.normal_(block.o_proj.weight, std=0.05)
    engine.adapter.provenance = {"trained": True, "steps": 3}
    path = tmp_path / "adapter.safetensors"
    engine.adapter.save(path, tiny.fingerprint)
    loaded = InjectionAdapter.load(path, engine.body, tiny.fingerprint)
    assert loaded.config == engine.adapter.config and loaded.provenance["steps"] == 3
    assert loaded.fingerprint() == engine.adapter.fingerprint()
    with pytest.raises(ModelUnavailable, match="trained for base model"):
        InjectionAdapter.load(path, engine.body, "some-other-model")


def test_adapter_retargeted_to_another_tree_keeps_the_weights(tiny):
    engine = engine_for(tiny)
    wider = TreeConfig(**{**engine.adapter.config.to_dict(), "pool_size": engine.adapter.config.pool_size * 2})
    retargeted = engine.adapter.retargeted(wider)
    assert retargeted.config == wider and not retargeted.provenance["trained"]
    assert retargeted.blocks[0] is engine.adapter.blocks[0]
    assert retargeted.fingerprint() != engine.adapter.fingerprint()  # its contexts are built differently
    with pytest.raises(InvalidInput, match="cannot read trees of M=3; the weights fit only the same M"):
        engine.adapter.retargeted(TreeConfig(**{**wider.to_dict(), "n_layers": wider.n_layers + 1}))


def test_adapter_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    names = shipped_adapter_names()
    assert {"default", "pool32"} <= set(names)
    assert adapter_file("pool32") == SHIPPED_ADAPTERS / "pool32" / "adapter.safetensors"
    assert adapter_file("default") == default_adapter_path()
    for name in names:  # every shipped adapter is complete: weights, sidecar with its config, loss log
        assert read_adapter_config(adapter_file(name)).n_layers >= 1
        assert (SHIPPED_ADAPTERS / name / "train-log.jsonl").is_file()
    assert read_adapter_config(adapter_file("pool32")).pool_size == 32
    own = tmp_path / "adapter.safetensors"
    assert adapter_file(own) == own and adapter_file("runs/x/adapter.safetensors") == Path("runs/x/adapter.safetensors")
    monkeypatch.chdir(tmp_path)
    Path("pool32").write_bytes(b"")  # an existing file of that name wins over the shipped adapter
    assert adapter_file("pool32") == Path("pool32")
    with pytest.raises(InvalidInput, match=r"no adapter file 'pool99' and no shipped adapter.*default, pool32"):
        adapter_file("pool99")


def test_tree_config_validation():
    with pytest.raises(ConfigError):
        TreeConfig(depth=0)
    with pytest.raises(ConfigError):
        TreeConfig(chunk_size=4, depth=3)
    with pytest.raises(ConfigError):
        TreeConfig(encoding="both")
    assert TreeConfig().compression_ratio == 8.0
    assert TreeConfig().nodes_per_chunk == 14


def test_lower_model_shares_the_base_weights(tiny):
    engine = engine_for(tiny)
    assert isinstance(engine.compressor, Compressor)
    assert engine.compressor.body.layers[0].self_attn.q_proj is tiny.model.model.layers[0].self_attn.q_proj


def test_directory_fingerprint_is_cached_and_follows_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from sharedllm.common.model_loading import _directory_fingerprint, cache_dir

    monkeypatch.setenv("SHAREDLLM_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    first = _directory_fingerprint(model_dir)
    assert list((cache_dir() / "fingerprints").glob("*.json"))
    assert _directory_fingerprint(model_dir) == first
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _directory_fingerprint(model_dir) != first
