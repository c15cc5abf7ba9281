"""What a stored context costs, measured against what it replaces.

Why: the product's claim is that a compressed context is far smaller than the key/value cache
the base model would hold for the same document, so every context reports both numbers:

    full KV cache bytes = 2 (keys, values) * base_n_layers * n_kv_heads * head_dim * dtype_bytes * n_tokens

with the tree's dtype. For a full chunk the ratio is about (N * P / C) * (M / base_n_layers):
N = 2**(D+1) - 2 stored nodes of P entries per C tokens, M of the model's layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from sharedllm.common.generated.sharedllm.v1 import context_pb2 as pb
from sharedllm.common.store import codec


def full_kv_cache_bytes(*, n_tokens: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of the base model's key/value cache over `n_tokens` tokens, all layers."""
    return 2 * n_layers * n_kv_heads * head_dim * dtype_bytes * n_tokens


@dataclass(frozen=True)
class StorageReport:
    stored_bytes: int  # every stored byte of the context, manifest included
    n_tokens: int
    full_kv_cache_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.stored_bytes / self.n_tokens

    @property
    def kv_cache_ratio(self) -> float:
        """Stored bytes over the full KV cache of the same tokens (smaller is better)."""
        return self.stored_bytes / self.full_kv_cache_bytes


def storage_report(manifest: pb.ContextManifest, stored_bytes: int) -> StorageReport:
    """For `EncodedContext.manifest, .nbytes` or `ContextInfo.manifest, .stored_bytes`."""
    shapes = manifest.shapes
    full = full_kv_cache_bytes(
        n_tokens=manifest.n_tokens,
        n_layers=shapes.base_n_layers,
        n_kv_heads=shapes.n_kv_heads,
        head_dim=shapes.head_dim,
        dtype_bytes=codec.torch_dtype(manifest).itemsize,
    )
    return StorageReport(stored_bytes, manifest.n_tokens, full)
