"""Tree kernels: multi-level pooling and the injection gather.

`pool_nodes` and `gather_injection` dispatch to Triton on CUDA devices and to the torch
reference elsewhere; see `sharedllm.common.kernels.dispatch`.
"""

from sharedllm.common.kernels.dispatch import gather_injection, pool_nodes, set_kernel_backend

__all__ = ["gather_injection", "pool_nodes", "set_kernel_backend"]
