"""Shared fixtures: the tiny random model, the real default model, real redis-servers and small
random context trees."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the CPU decode-attention kernel before any test needs it: the first build on a
    machine takes about 25 s, which would otherwise fall inside the start-up timeout of whichever
    test's server warms up first. Later processes, the servers the tests start included, load it."""
    from sharedllm.common.kernels import decode_attention

    decode_attention.load()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter file for the tiny model and tree (tiny_model.TINY_TREE) whose injection changes
    the output (o_proj not zero), so that equal answers from two paths show they read the same
    context, not merely that both ignored it. What the services, cells and workers load."""
    import torch
    from tiny_model import TINY_TREE

    from sharedllm.common.engine.adapter import InjectionAdapter
    from sharedllm.common.engine.llama import LlamaBody
    from sharedllm.common.model_loading import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu")
    adapter = InjectionAdapter.initialise(LlamaBody(loaded.model), TINY_TREE)
    generator = torch.Generator().manual_seed(0)
    for block in adapter.blocks:
        block.o_proj.weight.copy_(torch.randn(block.o_proj.weight.shape, generator=generator) * 0.05)
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    adapter.save(path, loaded.fingerprint)
    return path


@pytest.fixture(scope="session")
def real_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once for the whole session."""
    from sharedllm.common.model_loading import load_model

    return load_model(None, device="cpu")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server shared by the session; tests use their own context ids or tenants."""
    from redis_server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def make_redis_server(tmp_path):
    """Start private redis-servers that a test may stop, kill or restart; all stopped afterwards."""
    from redis_server import RedisServer

    servers = []

    def make(**options):
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        servers.append(RedisServer(directory, **options))
        return servers[-1].start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def tenant() -> str:
    """A fresh tenant, so tests sharing one store (or one redis-server) never see each other's contexts."""
    from sharedllm.common.store import new_context_id

    return f"t-{new_context_id()}"


@pytest.fixture
def make_tree():
    """Build small random ContextTrees (no model): (dtype, n_chunks, seed) -> ContextTree.

    Two full chunks plus a partial one, with some short nodes, and NaN, infinities and -0.0
    among the entries, so byte-exact round trips are really tested.
    """
    import torch

    from sharedllm.common.config import TreeConfig
    from sharedllm.common.engine.tree import ContextTree

    config = TreeConfig(n_layers=2, chunk_size=16, depth=2, pool_size=4)

    def make(dtype=torch.float32, n_chunks=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        m, n, p, kv, hd, hidden = config.n_layers, config.nodes_per_chunk, config.pool_size, 2, 8, 12
        shape = (m, n_chunks, n, p, kv, hd)
        counts = torch.randint(1, p + 1, (n_chunks, n), generator=g, dtype=torch.int32)
        valid = (torch.arange(p).view(1, 1, p) < counts.unsqueeze(-1)).view(1, n_chunks, n, p, 1, 1)
        keys = torch.randn(shape, generator=g).to(dtype) * valid
        values = torch.randn(shape, generator=g).to(dtype) * valid
        keys.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
        lengths = (config.chunk_size,) * (n_chunks - 1) + (7,)
        token_ids = torch.randint(0, 49_152, (sum(lengths),), generator=g, dtype=torch.int32)
        rkeys = torch.randn(n_chunks, n, hidden, generator=g)
        return ContextTree(config, lengths, keys, values, counts, rkeys, token_ids)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: the machine has two cores, shared with servers and subprocesses the
    tests start; oversubscribed torch threads stall (about 5x slower here)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
