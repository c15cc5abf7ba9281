"""The compiled CPU attention of decoding rows (common/kernels/decode_attention.cpp): the same
values as torch's attention, each row's bits independent of the other rows and of the threads,
clear errors for what it does not take, and the decoder's use of it."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sharedllm.common.kernels import decode_attention

LAYERS = 3


@pytest.fixture(scope="module")
def kernel():
    module = decode_attention.load()
    assert module is not None, "the kernel must build here (g++ and ninja are declared dependencies)"
    return module


def caches(rows: int, kv: int, capacity: int, head_dim: int, seed: int = 0) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(seed)
    shape = (LAYERS, 1, kv, capacity, head_dim)
    keys = [torch.randn(shape, generator=generator) for _ in range(rows)]
    values = [torch.randn(shape, generator=generator) for _ in range(rows)]
    return keys, values


def reference(q: torch.Tensor, keys: list, values: list, lengths: list[int], layer: int, scale: float) -> torch.Tensor:
    """torch's attention, row by row: what the decoder used before the kernel."""
    rows = []
    for r, n in enumerate(lengths):
        k, v = keys[r][layer, :, :, :n], values[r][layer, :, :, :n]
        out = F.scaled_dot_product_attention(q[r : r + 1].unsqueeze(2), k, v, scale=scale, enable_gqa=True)
        rows.append(out[0, :, 0])
    return torch.stack(rows)


@pytest.mark.parametrize(("heads", "kv", "head_dim"), [(9, 3, 64), (4, 2, 16), (8, 8, 8), (16, 2, 128)])
def test_the_kernel_gives_torchs_attention(kernel, heads, kv, head_dim):
    lengths = [1, 2, 17, 300, 701]
    keys, values = caches(len(lengths), kv, 720, head_dim)
    q = torch.randn(len(lengths), heads, head_dim)
    scale = head_dim**-0.5
    for layer in range(LAYERS):
        got = kernel.decode_attention(q, keys, values, lengths, layer, scale)
        torch.testing.assert_close(got, reference(q, keys, values, lengths, layer, scale), rtol=1e-5, atol=1e-6)


def test_rows_with_caches_of_different_capacities(kernel):
    """As served: each row's cache holds its own prompt and answer, so capacities differ."""
    capacities, lengths = [40, 900, 130, 7], [40, 512, 129, 1]
    generator = torch.Generator().manual_seed(3)
    keys = [torch.randn(LAYERS, 1, 3, c, 64, generator=generator) for c in capacities]
    values = [torch.randn(LAYERS, 1, 3, c, 64, generator=generator) for c in capacities]
    q = torch.randn(len(lengths), 9, 64, generator=generator)
    got = kernel.decode_attention(q, keys, values, lengths, 2, 0.125)
    torch.testing.assert_close(got, reference(q, keys, values, lengths, 2, 0.125), rtol=1e-5, atol=1e-6)


def test_scores_far_apart_neither_overflow_nor_vanish(kernel):
    """One key 200 above the rest takes all the weight (the others' exp underflows cleanly), and
    scores spread over 200 give torch's values."""
    keys, values = caches(1, 1, 64, 8)
    q = torch.zeros(1, 1, 8)
    q[0, 0, 0] = 1.0
    keys[0][0, 0, 0, :, 0] = -100.0
    keys[0][0, 0, 0, 63, 0] = 100.0
    got = kernel.decode_attention(q, keys, values, [64], 0, 1.0)
    torch.testing.assert_close(got[0, 0], values[0][0, 0, 0, 63], rtol=1e-5, atol=1e-6)
    keys[0][0, 0, 0, :, 0] = torch.linspace(-100.0, 100.0, 64)
    got = kernel.decode_attention(q, keys, values, [64], 0, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q, keys, values, [64], 0, 1.0), rtol=1e-5, atol=1e-6)


def test_a_row_has_the_same_bits_alone_batched_and_on_any_number_of_threads(kernel):
    lengths = [700, 5, 333, 129, 64, 1000]
    keys, values = caches(len(lengths), 3, 1024, 64, seed=1)
    q = torch.randn(len(lengths), 9, 64)
    batched = kernel.decode_attention(q, keys, values, lengths, 1, 0.125)
    for r in range(len(lengths)):
        alone = kernel.decode_attention(
            q[r : r + 1].contiguous(), keys[r : r + 1], values[r : r + 1], [lengths[r]], 1, 0.125
        )
        assert torch.equal(alone[0], batched[r])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = kernel.decode_attention(q, keys, values, lengths, 1, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, batched)


def test_the_kernel_leaves_the_threads_of_a_batching_decoder_alone():
    """As in a batching decoder (engine/threads.py): every thread runs torch single-threaded but
    the model's, which keeps two. The kernel must not put the model's thread back to one (an
    at::parallel_for compiled into it did: the decoder then read prompts 1.8 times slower)."""
    script = (
        "import threading, torch\n"
        "from sharedllm.common.engine import threads\n"
        "from sharedllm.common.kernels import decode_attention\n"
        "kernel = decode_attention.load()\n"
        "count = threads.keep_single_threaded()\n"
        "taken, reset, seen = threading.Event(), threading.Event(), []\n"
        "def model():\n"
        "    threads.use(count); taken.set(); reset.wait()\n"
        "    cache = torch.randn(1, 1, 3, 100, 64)\n"
        "    kernel.decode_attention(torch.randn(2, 9, 64), [cache] * 2, [cache] * 2, [10, 20], 0, 0.125)\n"
        "    seen.append(torch.get_num_threads())\n"
        "worker = threading.Thread(target=model); worker.start(); taken.wait()\n"
        "threads.keep_single_threaded(); reset.set(); worker.join()\n"
        "print(seen[0])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"]


def test_what_the_kernel_does_not_take_is_a_clear_error(kernel):
    keys, values = caches(2, 3, 32, 64)
    q = torch.randn(2, 9, 64)
    with pytest.raises(RuntimeError, match="reads 33 positions of a cache of 32"):
        kernel.decode_attention(q, keys, values, [4, 33], 0, 0.125)
    with pytest.raises(RuntimeError, match="reads 0 positions"):
        kernel.decode_attention(q, keys, values, [4, 0], 0, 0.125)
    with pytest.raises(RuntimeError, match="layer 3 is outside the cache"):
        kernel.decode_attention(q, keys, values, [4, 4], LAYERS, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.decode_attention(q.double(), keys, values, [4, 4], 0, 0.125)
    with pytest.raises(RuntimeError, match="head_dim 48"):
        kernel.decode_attention(torch.randn(2, 9, 48), keys, values, [4, 4], 0, 0.125)
    with pytest.raises(RuntimeError, match="one cache and one length per row"):
        kernel.decode_attention(q, keys[:1], values, [4, 4], 0, 0.125)
    with pytest.raises(RuntimeError, match="not a group"):
        kernel.decode_attention(torch.randn(2, 10, 64), keys, values, [4, 4], 0, 0.125)


def test_without_a_compiler_the_kernel_is_none_and_the_log_says_why(tmp_path):
    """A fresh build directory and no C++ compiler (CXX names none): load() gives None, once
    logged, and the decoder keeps torch's attention."""
    script = (
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from sharedllm.common.kernels import decode_attention\n"
        "assert decode_attention.load() is None\n"
        "assert decode_attention.load() is None\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-compiler")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("could not be built, decoding uses torch's attention") == 1


def test_ninja_is_found_off_the_path(tmp_path, monkeypatch):
    """`make test` runs the environment's Python without activating it, so the ninja package's
    program need not be on PATH, where torch's builder looks: the loader puts it there."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="Ninja is required"):
        cpp_extension.verify_ninja_availability()
    decode_attention._ninja_on_path()
    cpp_extension.verify_ninja_availability()


def test_a_lock_left_by_a_dead_build_is_removed_and_a_live_one_waited_for(tmp_path):
    """torch's builder waits forever on its lock file; a lock older than any build is removed,
    and a younger one is waited for until its builder removes it."""
    abandoned = tmp_path / "abandoned" / "lock"
    abandoned.parent.mkdir()
    abandoned.touch()
    old = time.time() - decode_attention.BUILD_TIMEOUT_S - 60
    os.utime(abandoned, (old, old))
    decode_attention.clear_abandoned_lock(abandoned)
    assert not abandoned.exists()

    live = tmp_path / "live" / "lock"
    live.parent.mkdir()
    live.touch()
    builder = threading.Timer(0.3, live.unlink)
    builder.start()
    started = time.perf_counter()
    decode_attention.clear_abandoned_lock(live, poll_s=0.05)
    assert 0.25 < time.perf_counter() - started < 5
    builder.join()
    decode_attention.clear_abandoned_lock(live)  # no lock: returns at once
    # The lock is the one torch's builder takes: <build directory>/lock.
    from torch.utils import cpp_extension

    assert "os.path.join(build_directory, 'lock')" in inspect.getsource(cpp_extension._jit_compile)


def test_builds_go_where_torch_extensions_dir_says(tmp_path, monkeypatch):
    """The image sets TORCH_EXTENSIONS_DIR to the cache volume; without it, torch's default root."""
    from torch.utils import cpp_extension

    name = decode_attention.build_name()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert decode_attention.build_directory(name) == tmp_path / name
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert decode_attention.build_directory(name) == Path(cpp_extension.get_default_build_root()) / name


def test_supports_only_what_it_was_compiled_for():
    cpu = torch.device("cpu")
    assert decode_attention.supports(cpu, torch.float32, 9, 3, 64)
    assert not decode_attention.supports(cpu, torch.bfloat16, 9, 3, 64)
    assert not decode_attention.supports(torch.device("cuda"), torch.float32, 9, 3, 64)
    assert not decode_attention.supports(cpu, torch.float32, 9, 3, 48)
    assert not decode_attention.supports(cpu, torch.float32, 32, 2, 64)  # 16 query heads per key/value head


def test_the_decoder_steps_with_the_kernel_as_with_torchs_attention(tiny_model_dir, monkeypatch):
    """Decoding rows alone and beside a prompt's block: the kernel's logits are torch's up to
    rounding, with the same greedy token; SHAREDLLM_KERNELS=torch keeps torch's attention."""
    from sharedllm.common.engine.decoder import Decoder
    from sharedllm.common.engine.engine import Engine

    engine = Engine.load(str(tiny_model_dir), device="cpu")
    assert engine.decoder.decode_kernel is not None
    monkeypatch.setenv("SHAREDLLM_KERNELS", "torch")
    plain = Decoder(engine.body, engine.adapter, engine.decoder.eos_ids)
    assert plain.decode_kernel is None
    prompt = list(range(300, 560))

    def steps(decoder: Decoder) -> list[torch.Tensor]:
        first, second = engine.body.new_cache(400), engine.body.new_cache(400)
        with torch.inference_mode():
            decoder.step_rows([prompt], [first], [None])
            decoder.step_rows([prompt[:100]], [second], [None])
            return [
                decoder.step_rows([[17], [18]], [first, second], [None, None]),  # decoding rows only
                decoder.step_rows([prompt[100:228], [19]], [second, first], [None, None]),  # a prompt block first
                decoder.step_rows([[20], [21]], [first, second], [None, None]),
            ]

    for got, expected in zip(steps(engine.decoder), steps(plain), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
