"""Kernels: the tree's multi-level pooling and injection gather, and the CPU's packed linears.

`pool_nodes` and `gather_injection` dispatch to Triton on CUDA devices and to the torch
reference elsewhere; see `sharedllm.common.kernels.dispatch`. `packed_linear` lays the base
model's weights out for oneDNN on the CPU.
"""

from sharedllm.common.kernels.dispatch import gather_injection, pool_nodes, set_kernel_backend

__all__ = ["gather_injection", "pool_nodes", "set_kernel_backend"]
