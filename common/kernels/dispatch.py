"""Choose between the Triton kernels and the torch reference, per call.

`auto` (the default) uses Triton for CUDA tensors when Triton imports and the reference
otherwise, so CPU-only hosts and tests need no configuration. One switch forces either
backend, for benchmarks and for bisecting a numerical difference: the environment variable
`SHAREDLLM_KERNELS=auto|triton|torch`, read at every call, or `set_kernel_backend`, which
takes precedence over it. Forcing `triton` for CPU tensors is an error unless Triton's
interpreter is on (`TRITON_INTERPRET=1`), so a misconfigured server fails loudly instead of
silently running the slow path.
"""

from __future__ import annotations

import os

import torch

from sharedllm.common.kernels import reference, triton_kernels
from sharedllm.common.kernels.triton_kernels import TritonUnavailable

ENV_VAR = "SHAREDLLM_KERNELS"
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

_override: str | None = None


def _check_name(name: str, source: str) -> str:
    """Reject a typo before it silently selects a backend."""
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def set_kernel_backend(name: str | None) -> None:
    """Force `triton` or `torch`, or choose per device with `auto`; None defers to the environment."""
    global _override
    _override = None if name is None else _check_name(name, "set_kernel_backend")


def requested_backend() -> str:
    """The switch as set: `set_kernel_backend` if called, else `SHAREDLLM_KERNELS`, else `auto`."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def backend_for(device: torch.device) -> str:
    """The backend (`triton` or `torch`) a call on `device` runs, raising if `triton` is forced
    where it cannot run."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_kernels.triton_available() else "torch"
    if not triton_kernels.triton_available():
        raise TritonUnavailable(f"{ENV_VAR}/set_kernel_backend forces 'triton' but Triton is not installed")
    if device.type != "cuda" and not triton_kernels.interpreter_enabled():
        raise TritonUnavailable(
            f"'triton' is forced for {device.type} tensors; set TRITON_INTERPRET=1 before the kernels "
            "are first imported to run them through Triton's interpreter, or use 'auto' or 'torch'"
        )
    return "triton"


def pool_nodes(x: torch.Tensor, seq: torch.Tensor, start: torch.Tensor, end: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool every level of every chunk into node slots; see `reference.pool_nodes`."""
    impl = triton_kernels if backend_for(x.device) == "triton" else reference
    return impl.pool_nodes(x, seq, start, end, mode)


def gather_injection(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    rows: torch.Tensor,
    chunk_of_row: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather selected nodes for cross-attention, rotating keys once; see `reference.gather_injection`."""
    impl = triton_kernels if backend_for(keys.device) == "triton" else reference
    return impl.gather_injection(keys, values, counts, rows, chunk_of_row, cos, sin)
