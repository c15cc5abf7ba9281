"""The tree kernels: Triton against the torch reference, and the backend switch.

The `test_triton_*` tests compare the Triton kernels with the reference. They run on CUDA when
there is a GPU and, always, on the CPU through Triton's interpreter in a child pytest process
(`test_kernels_in_triton_interpreter`): `triton.jit` decides between compiling and interpreting
when the kernels module is imported, so the interpreter can only be switched on reliably in a
fresh process started with `TRITON_INTERPRET=1`, whatever the rest of the suite imported.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sharedllm.common.kernels import dispatch, reference, triton_kernels
from sharedllm.common.kernels.triton_kernels import TritonUnavailable

REPO = Path(__file__).resolve().parents[1]
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Mean pooling sums in a different order than the reference's cumulative sums: one rounding
# of the result may differ. Rotated keys are rounded once here and after each operation there,
# which only fp32 (exact) is immune to.
MEAN_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 1e-3)}
ROPE_TOL = {torch.float32: (0.0, 0.0), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


def _triton_device() -> str | None:
    """Where the Triton tests of this process run: the interpreter's CPU, a GPU, or nowhere."""
    if triton_kernels.interpreter_enabled():
        return "cpu"
    if triton_kernels.triton_available() and torch.cuda.is_available():
        return "cuda"
    return None


def _require_triton_device() -> str:
    device = _triton_device()
    if device is None:
        pytest.skip("needs CUDA here; on the CPU these run in test_kernels_in_triton_interpreter")
    return device


def make_plan(nodes: list[list[tuple[int, int, int]]], pool: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq, start, end for nodes[b][n] = (sequence, s, e): the span [s, e) of n = e - s tokens is
    cut into E = min(n, P) blocks [s + floor(b n / E), s + floor((b + 1) n / E)), slots b >= E empty."""
    b, n = len(nodes), len(nodes[0])
    seq = torch.zeros(b, n, dtype=torch.int64)
    start = torch.zeros(b, n, pool, dtype=torch.int64)
    end = torch.zeros(b, n, pool, dtype=torch.int64)
    for i, row in enumerate(nodes):
        for j, (sequence, s, e) in enumerate(row):
            seq[i, j] = sequence
            length = e - s
            blocks = min(length, pool)
            for slot in range(pool):
                if slot < blocks:
                    start[i, j, slot] = s + slot * length // blocks
                    end[i, j, slot] = s + (slot + 1) * length // blocks
                else:
                    start[i, j, slot] = end[i, j, slot] = e
    return seq, start, end


def tree_nodes(n_seq: int, length: int, depth: int) -> list[list[tuple[int, int, int]]]:
    """single_pass layout: sequence b is chunk b, its nodes the halves, quarters, ... of it."""
    nodes = []
    for b in range(n_seq):
        row = []
        for level in range(1, depth + 1):
            parts = 2**level
            row += [(b, k * length // parts, (k + 1) * length // parts) for k in range(parts)]
        nodes.append(row)
    return nodes


def random_nodes(gen: torch.Generator, n_seq: int, length: int, b: int, n: int) -> list[list[tuple[int, int, int]]]:
    """Arbitrary spans: long, short (fewer tokens than P), single-token and empty nodes."""
    nodes = []
    for _ in range(b):
        row = []
        for _ in range(n):
            s = int(torch.randint(0, length + 1, (1,), generator=gen))
            e = int(torch.randint(s, length + 1, (1,), generator=gen))
            row.append((int(torch.randint(0, n_seq, (1,), generator=gen)), s, e))
        nodes.append(row)
    nodes[0][0] = (0, length - 1, length)  # one token, at the very end of a sequence
    nodes[-1][-1] = (n_seq - 1, 2, 2)  # an empty node
    return nodes


def random_x(
    gen: torch.Generator, shape: tuple[int, int, int, int, int], dtype: torch.dtype, contiguous: bool
) -> torch.Tensor:
    """x [G, S, H, L, Dh]; the strided variant is the encoder's [G, S, L, H, Dh] output transposed."""
    g, s, h, length, dh = shape
    if contiguous:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randn((g, s, length, h, dh), generator=gen).to(dtype).transpose(2, 3)


# (G, S, H, L, Dh, P, layout, contiguous x): tree layouts have depth 2 (N = 6) or 3 (N = 14).
POOL_SHAPES = [
    (2, 2, 3, 13, 48, 4, "random", True),
    (1, 2, 2, 64, 64, 32, "tree2", True),
    (2, 1, 1, 37, 20, 3, "tree3", False),
    (3, 2, 2, 9, 16, 1, "random", False),
    (1, 1, 2, 24, 8, 32, "random", True),
]


def _pool_case(shape: tuple, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    g, s, h, length, dh, pool, layout, contiguous = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    tree = layout.startswith("tree")
    nodes = tree_nodes(s, length, int(layout[-1])) if tree else random_nodes(gen, s, length, 2, 3)
    seq, start, end = make_plan(nodes, pool)
    if tree:  # as the compressor builds it: one sequence per chunk, broadcast over its nodes
        seq = seq[:, :1].expand_as(seq)
    x = random_x(gen, (g, s, h, length, dh), dtype, contiguous)
    return tuple(t.to(device) for t in (x, seq, start, end))


@pytest.mark.parametrize("mode", ["last", "mean"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_triton_pool_nodes_matches_reference(shape: tuple, dtype: torch.dtype, mode: str) -> None:
    x, seq, start, end = _pool_case(shape, dtype, _require_triton_device())
    got = triton_kernels.pool_nodes(x, seq, start, end, mode)
    want = reference.pool_nodes(x, seq, start, end, mode)
    assert got.dtype == want.dtype and got.shape == want.shape
    if mode == "last":
        assert torch.equal(got, want)
    else:
        rtol, atol = MEAN_TOL[dtype]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert not got[:, end == start].any(), "empty slots must be zero"


# (M, T, P, H, Dh, S, rotate)
GATHER_SHAPES = [
    (2, 5, 4, 3, 48, 3, True),
    (1, 6, 32, 2, 64, 4, True),
    (2, 4, 3, 1, 20, 5, False),
    (1, 3, 1, 2, 8, 2, True),
    (2, 4, 4, 2, 6, 3, True),
]


def _gather_case(shape: tuple, dtype: torch.dtype, device: str) -> tuple[torch.Tensor | None, ...]:
    m, t, pool, h, dh, s, rotate = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    keys = torch.randn((m, t, pool, h, dh), generator=gen).to(dtype)
    # values as a strided view, as when the table is a slice of a larger store
    values = torch.randn((m, t, pool, h, dh + 3), generator=gen).to(dtype)[..., 1 : dh + 1]
    counts = torch.randint(0, pool + 1, (t,), generator=gen, dtype=torch.int32)
    rows = torch.randint(0, t, (s,), generator=gen)
    chunk_of_row = torch.sort(torch.randint(0, 7, (s,), generator=gen)).values
    cos = torch.randn((7, dh), generator=gen) if rotate else None
    sin = torch.randn((7, dh), generator=gen) if rotate else None
    tensors = (keys, values, counts, rows, chunk_of_row, cos, sin)
    return tuple(None if x is None else x.to(device) for x in tensors)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
def test_triton_gather_injection_matches_reference(shape: tuple, dtype: torch.dtype) -> None:
    args = _gather_case(shape, dtype, _require_triton_device())
    k, v, mask = triton_kernels.gather_injection(*args)
    k_ref, v_ref, mask_ref = reference.gather_injection(*args)
    assert k.shape == k_ref.shape and k.dtype == k_ref.dtype
    assert torch.equal(v, v_ref) and torch.equal(mask, mask_ref)
    if shape[-1]:
        rtol, atol = ROPE_TOL[dtype]
        torch.testing.assert_close(k, k_ref, rtol=rtol, atol=atol)
    else:
        assert torch.equal(k, k_ref)


def test_triton_kernels_handle_empty_batches() -> None:
    device = _require_triton_device()
    x = torch.randn(2, 1, 2, 5, 8, device=device)
    seq = torch.zeros(0, 3, dtype=torch.int64, device=device)
    start = end = torch.zeros(0, 3, 4, dtype=torch.int64, device=device)
    assert triton_kernels.pool_nodes(x, seq, start, end, "mean").shape == (2, 0, 3, 4, 2, 8)
    keys = torch.randn(1, 3, 4, 2, 8, device=device)
    none = torch.zeros(0, dtype=torch.int64, device=device)
    counts = torch.full((3,), 4, dtype=torch.int32, device=device)
    k, v, mask = triton_kernels.gather_injection(keys, keys, counts, none, none, None, None)
    assert k.shape == v.shape == (1, 2, 0, 8) and mask.shape == (0,)


def test_triton_forced_backend_runs_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    device = _require_triton_device()
    calls: list[str] = []
    monkeypatch.setattr(reference, "pool_nodes", lambda *a: calls.append("torch"))
    dispatch.set_kernel_backend("triton")
    try:
        x, seq, start, end = _pool_case(POOL_SHAPES[0], torch.float32, device)
        assert dispatch.pool_nodes(x, seq, start, end, "last").shape[-1] == x.shape[-1]
    finally:
        dispatch.set_kernel_backend(None)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["last", "mean"])
def test_gpu_pool_nodes_serving_shape(mode: str) -> None:
    """Llama-shaped heads (32 x 128) and a full-size chunk, through the public dispatch."""
    if not triton_kernels.triton_available():
        pytest.skip("needs Triton")
    seq, start, end = (t.cuda() for t in make_plan(tree_nodes(2, 1024, 3), 32))
    x = torch.randn(4, 2, 32, 1024, 128, device="cuda", dtype=torch.bfloat16)
    got = dispatch.pool_nodes(x, seq, start, end, mode)
    want = reference.pool_nodes(x, seq, start, end, mode)
    if mode == "last":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-3)


def test_kernels_in_triton_interpreter() -> None:
    """Run the test_triton_* tests above on the CPU, in a child process with the interpreter on."""
    if not triton_kernels.triton_available():
        pytest.skip("Triton is not installed")
    if triton_kernels.interpreter_enabled():
        pytest.skip("this process already runs the interpreter tests itself")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_triton_"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert result.returncode == 0, output[-6000:]
    assert "passed" in summary and "skipped" not in summary, output[-3000:]


@pytest.fixture
def clean_switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start from the default switch and restore it after the test."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_kernel_backend(None)
    yield
    dispatch.set_kernel_backend(None)


@pytest.mark.usefixtures("clean_switch")
def test_switch_defaults_to_auto_and_cpu_uses_reference() -> None:
    assert dispatch.requested_backend() == "auto"
    assert dispatch.backend_for(torch.device("cpu")) == "torch"
    x, seq, start, end = _pool_case(POOL_SHAPES[0], torch.float32, "cpu")
    want = reference.pool_nodes(x, seq, start, end, "mean")
    assert torch.equal(dispatch.pool_nodes(x, seq, start, end, "mean"), want)
    args = _gather_case(GATHER_SHAPES[0], torch.float32, "cpu")
    for got, want in zip(dispatch.gather_injection(*args), reference.gather_injection(*args), strict=True):
        assert torch.equal(got, want)


@pytest.mark.usefixtures("clean_switch")
def test_switch_auto_picks_triton_for_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_kernels, "triton_available", lambda: True)
    assert dispatch.backend_for(torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(triton_kernels, "triton_available", lambda: False)
    assert dispatch.backend_for(torch.device("cuda", 0)) == "torch"


@pytest.mark.usefixtures("clean_switch")
def test_switch_environment_and_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.backend_for(torch.device("cuda", 0)) == "torch"
    dispatch.set_kernel_backend("auto")  # the function wins over the environment
    assert dispatch.requested_backend() == "auto"
    dispatch.set_kernel_backend(None)
    assert dispatch.requested_backend() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, " Triton ")
    assert dispatch.requested_backend() == "triton"


@pytest.mark.usefixtures("clean_switch")
def test_switch_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        dispatch.set_kernel_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.backend_for(torch.device("cpu"))


@pytest.mark.usefixtures("clean_switch")
def test_forcing_triton_where_it_cannot_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    dispatch.set_kernel_backend("triton")
    monkeypatch.setattr(triton_kernels, "interpreter_enabled", lambda: False)
    with pytest.raises(TritonUnavailable, match="TRITON_INTERPRET=1"):
        dispatch.backend_for(torch.device("cpu"))
    x, seq, start, end = _pool_case(POOL_SHAPES[0], torch.float32, "cpu")
    with pytest.raises(TritonUnavailable):
        dispatch.pool_nodes(x, seq, start, end, "last")
    monkeypatch.setattr(triton_kernels, "triton_available", lambda: False)
    with pytest.raises(TritonUnavailable, match="not installed"):
        dispatch.backend_for(torch.device("cuda", 0))


def test_wrappers_refuse_cpu_tensors_without_interpreter() -> None:
    if triton_kernels.interpreter_enabled() or not triton_kernels.triton_available():
        pytest.skip("needs Triton, compiled rather than interpreted")
    x, seq, start, end = _pool_case(POOL_SHAPES[0], torch.float32, "cpu")
    with pytest.raises(TritonUnavailable, match="CUDA tensors"):
        triton_kernels.pool_nodes(x, seq, start, end, "last")


def _compile_for_hopper(kernel: object, pointers: dict[str, str], constexprs: dict[str, object]) -> bytes:
    """Compile a kernel ahead of time for sm_90, integer arguments as i64; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = inspect.signature(kernel.fn).parameters
    signature = {n: pointers.get(n) or ("constexpr" if n in constexprs else "i64") for n in names}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = triton_kernels._COMPILE_OPTIONS
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


@pytest.mark.parametrize("variant", [True, False], ids=["mean-rope", "last-plain"])
def test_compiled_kernels_lower_to_cubin(variant: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter accepts code the compiler rejects; compile for a real GPU target too."""
    if triton_kernels.interpreter_enabled() or not triton_kernels.triton_available():
        pytest.skip("needs Triton, compiled rather than interpreted")
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    indices = dict.fromkeys(("seq_ptr", "start_ptr", "end_ptr"), "*i64")
    pool_pointers = {"x_ptr": "*bf16", "out_ptr": "*bf16", **indices}
    pool = {"MEAN": variant, "BLOCK_P": 32, "BLOCK_D": 128}
    assert _compile_for_hopper(triton_kernels._pool_nodes_kernel, pool_pointers, pool)
    gather_pointers = {
        "k_ptr": "*bf16",
        "v_ptr": "*bf16",
        "rows_ptr": "*i64",
        "chunk_ptr": "*i64",
        "cos_ptr": "*fp32",
        "sin_ptr": "*fp32",
        "k_out_ptr": "*bf16",
        "v_out_ptr": "*bf16",
    }
    gather = {"ROPE": variant, "BLOCK_P": 32, "BLOCK_D": 64}
    assert _compile_for_hopper(triton_kernels._gather_injection_kernel, gather_pointers, gather)
