"""The stored form of a context tree: a protobuf manifest and safetensors payloads.

Why this shape: the decoder first needs only the manifest and the retrieval keys, then a
handful of nodes per chunk, so every node is its own payload with its own checksum in the
manifest. The manifest is framed as `sha256(body) || body` and verified before it is parsed,
so a flipped byte anywhere is reported as corruption, never misread as another version or
another model. Nothing is pickled: tensors are safetensors, metadata is protobuf.

Errors: format version or fingerprints that do not match -> IncompatibleContext; a checksum,
length, shape or dtype mismatch or unparsable bytes -> DataCorruption.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass

import safetensors.torch
import torch
from google.protobuf.message import DecodeError

from sharedllm.common.config import ConfigError, TreeConfig
from sharedllm.common.engine.tree import ContextTree
from sharedllm.common.errors import DataCorruption, IncompatibleContext, InvalidInput
from sharedllm.common.generated.sharedllm.v1 import context_pb2 as pb

# 2: the retrieval-keys part also holds the document's token ids (evidence passages are cut from
# them); a version-1 context has none, so it is refused with IncompatibleContext, never misread.
FORMAT_VERSION = 2
DIGEST_BYTES = 32

DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.TENSOR_DTYPE_FLOAT32,
    torch.float16: pb.TENSOR_DTYPE_FLOAT16,
    torch.bfloat16: pb.TENSOR_DTYPE_BFLOAT16,
}
_TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
_ENCODINGS = {"single_pass": pb.ENCODING_SINGLE_PASS, "per_node": pb.ENCODING_PER_NODE}
_POOLINGS = {"last": pb.POOLING_LAST, "mean": pb.POOLING_MEAN}
_POSITIONS = {"chunk": pb.POSITIONS_CHUNK, "none": pb.POSITIONS_NONE}


@dataclass(frozen=True)
class Fingerprints:
    """The base model and adapter a context is built for; a reader must present the same pair."""

    model: str
    adapter: str


@dataclass(frozen=True)
class EncodedContext:
    """One context ready for a store: the framed manifest and the payloads it checksums.

    nodes are in chunk-major order: payload of (chunk b, node n) is `nodes[b * N + n]`.

    An appended version (`extend`) carries only its new nodes: the first `kept_nodes` payloads are
    those of the version it extends, which the store keeps instead of writing them again.
    """

    manifest_frame: bytes
    retrieval_keys: bytes
    nodes: tuple[bytes, ...]
    kept_nodes: int = 0

    @functools.cached_property
    def manifest(self) -> pb.ContextManifest:
        return decode_manifest(self.manifest_frame)

    @property
    def version(self) -> bytes:
        """Names this version of the context: the digest its manifest frame opens with."""
        return self.manifest_frame[:DIGEST_BYTES]

    @property
    def nbytes(self) -> int:
        """Every byte a store keeps for this context, manifest included (kept nodes too)."""
        return len(self.manifest_frame) + self.manifest.stored_bytes

    @property
    def written_bytes(self) -> int:
        """The bytes a store writes for it: all of them, less the kept nodes."""
        return len(self.manifest_frame) + len(self.retrieval_keys) + sum(map(len, self.nodes))


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def frame_manifest(manifest: pb.ContextManifest) -> bytes:
    """Serialise a manifest behind its own digest, so no byte of it is trusted unverified."""
    body = manifest.SerializeToString(deterministic=True)
    return sha256(body) + body


def lifetime_ms(manifest: pb.ContextManifest) -> int | None:
    """How long the context lives after each use; None: it never expires."""
    if manifest.expires_unix_ms == 0:
        return None
    return manifest.expires_unix_ms - manifest.created_unix_ms


def tree_config_message(cfg: TreeConfig) -> pb.TreeConfig:
    """The protobuf form of a tree config (manifests, and the decoder's GetServerInfo)."""
    return pb.TreeConfig(
        n_layers=cfg.n_layers,
        chunk_size=cfg.chunk_size,
        depth=cfg.depth,
        pool_size=cfg.pool_size,
        encoding=_ENCODINGS[cfg.encoding],
        pooling=_POOLINGS[cfg.pooling],
        positions=_POSITIONS[cfg.positions],
    )


def tree_config(manifest: pb.ContextManifest) -> TreeConfig:
    """The TreeConfig of a verified manifest."""
    cfg = manifest.tree_config
    return TreeConfig(
        n_layers=cfg.n_layers,
        chunk_size=cfg.chunk_size,
        depth=cfg.depth,
        pool_size=cfg.pool_size,
        encoding=_lookup(_ENCODINGS, cfg.encoding, "encoding"),
        pooling=_lookup(_POOLINGS, cfg.pooling, "pooling"),
        positions=_lookup(_POSITIONS, cfg.positions, "positions"),
    )


def torch_dtype(manifest: pb.ContextManifest) -> torch.dtype:
    if manifest.dtype not in _TORCH_DTYPES:
        raise DataCorruption(f"manifest names an unknown dtype {manifest.dtype}")
    return _TORCH_DTYPES[manifest.dtype]


def encode(
    tree: ContextTree,
    *,
    fingerprints: Fingerprints,
    base_n_layers: int,
    tenant: str,
    source_sha256: bytes,
    ttl_s: float | None,
    now_ms: int | None = None,
) -> EncodedContext:
    """Turn a tree into the parts a store keeps.

    base_n_layers: layers of the whole base model (for the storage accounting).
    source_sha256: sha256 of the document's canonical bytes (its token ids as little-endian uint32).
    ttl_s: lifetime after each use; None: never expires (the store may still evict it).
    """
    _check_encodable(tree, fingerprints, base_n_layers, source_sha256, ttl_s)
    _, _, n, _, kv, hd = tree.keys.shape
    nodes = _node_payloads(tree)
    rkeys = _index_payload(tree.retrieval_keys, tree.token_ids)
    manifest = pb.ContextManifest(
        format_version=FORMAT_VERSION,
        model_fingerprint=fingerprints.model,
        adapter_fingerprint=fingerprints.adapter,
        tree_config=tree_config_message(tree.config),
        n_chunks=tree.n_chunks,
        chunk_lengths=tree.chunk_lengths,
        nodes_per_chunk=n,
        dtype=DTYPES[tree.keys.dtype],
        shapes=pb.TensorShapes(
            n_kv_heads=kv, head_dim=hd, hidden=tree.retrieval_keys.shape[2], base_n_layers=base_n_layers
        ),
        node_entry_counts=tree.counts.flatten().tolist(),
        node_sha256=[sha256(payload) for payload in nodes],
        retrieval_keys_sha256=sha256(rkeys),
        source_sha256=source_sha256,
        n_tokens=tree.n_tokens,
        tenant=tenant,
        stored_bytes=len(rkeys) + sum(map(len, nodes)),
    )
    _set_lifetime(manifest, ttl_s, now_ms)
    return EncodedContext(frame_manifest(manifest), rkeys, nodes)


def extend(
    base: pb.ContextManifest,
    base_retrieval_keys: torch.Tensor,
    base_token_ids: torch.Tensor,
    kept_chunks: int,
    tail: ContextTree,
    *,
    source_sha256: bytes,
    ttl_s: float | None,
    now_ms: int | None = None,
) -> EncodedContext:
    """A new version of `base`: its first `kept_chunks` chunks as stored, then the chunks of `tail`
    (the re-encoded last chunk and the new text). Only the tail's nodes are payloads here; the
    kept ones are the base version's (EncodedContext.kept_nodes), so an append writes the
    manifest, the index part and the new nodes, never the document's earlier chunks again."""
    n = base.nodes_per_chunk
    if not 0 <= kept_chunks <= base.n_chunks:
        raise InvalidInput(f"cannot extend a context of {base.n_chunks} chunks keeping {kept_chunks}")
    if tail.config != tree_config(base):
        raise IncompatibleContext(f"the context was built with {tree_config(base)}, the new chunks with {tail.config}")
    if DTYPES.get(tail.keys.dtype) != base.dtype:
        raise IncompatibleContext(f"the context is stored as {torch_dtype(base)}, the new chunks are {tail.keys.dtype}")
    fingerprints = Fingerprints(base.model_fingerprint, base.adapter_fingerprint)
    _check_encodable(tail, fingerprints, base.shapes.base_n_layers, source_sha256, ttl_s)
    kept_tokens = sum(base.chunk_lengths[:kept_chunks])
    nodes = _node_payloads(tail)
    rkeys = _index_payload(
        torch.cat([base_retrieval_keys[:kept_chunks].cpu(), tail.retrieval_keys.detach().cpu()]),
        torch.cat([base_token_ids[:kept_tokens].cpu(), tail.token_ids.detach().cpu()]),
    )
    node_bytes = len(nodes[0])  # every node payload of a context has one size: fixed shapes, one dtype
    manifest = pb.ContextManifest()
    manifest.CopyFrom(base)
    del manifest.chunk_lengths[kept_chunks:]
    manifest.chunk_lengths.extend(tail.chunk_lengths)
    del manifest.node_entry_counts[kept_chunks * n :]
    manifest.node_entry_counts.extend(tail.counts.flatten().tolist())
    del manifest.node_sha256[kept_chunks * n :]
    manifest.node_sha256.extend(sha256(payload) for payload in nodes)
    manifest.n_chunks = len(manifest.chunk_lengths)
    manifest.n_tokens = kept_tokens + tail.n_tokens
    manifest.retrieval_keys_sha256 = sha256(rkeys)
    manifest.source_sha256 = source_sha256
    manifest.stored_bytes = len(rkeys) + node_bytes * manifest.n_chunks * n
    _set_lifetime(manifest, ttl_s, now_ms)
    return EncodedContext(frame_manifest(manifest), rkeys, nodes, kept_nodes=kept_chunks * n)


def _set_lifetime(manifest: pb.ContextManifest, ttl_s: float | None, now_ms: int | None) -> None:
    created = int(time.time() * 1000) if now_ms is None else now_ms
    manifest.created_unix_ms = created
    manifest.expires_unix_ms = 0 if ttl_s is None else created + max(1, round(ttl_s * 1000))


def _node_payloads(tree: ContextTree) -> tuple[bytes, ...]:
    """One safetensors payload per (chunk, node), chunk-major."""
    keys, values = tree.keys.detach().cpu(), tree.values.detach().cpu()  # one device copy, not one per node
    _, b, n, *_ = keys.shape
    return tuple(
        safetensors.torch.save({"keys": _contiguous(keys[:, c, i]), "values": _contiguous(values[:, c, i])})
        for c in range(b)
        for i in range(n)
    )


def _index_payload(retrieval_keys: torch.Tensor, token_ids: torch.Tensor) -> bytes:
    """The index part: retrieval keys and the document's token ids."""
    return safetensors.torch.save(
        {
            "retrieval_keys": _contiguous(retrieval_keys.detach().cpu()),
            "token_ids": _contiguous(token_ids.detach().cpu()),
        }
    )


def decode_manifest(frame: bytes, expected: Fingerprints | None = None) -> pb.ContextManifest:
    """Verify and parse a framed manifest; check fingerprints when `expected` is given."""
    if len(frame) <= DIGEST_BYTES or sha256(frame[DIGEST_BYTES:]) != frame[:DIGEST_BYTES]:
        raise DataCorruption("context manifest fails its checksum (corrupted or truncated)")
    try:
        manifest = pb.ContextManifest.FromString(frame[DIGEST_BYTES:])
    except DecodeError as exc:
        raise DataCorruption(f"context manifest does not parse: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise IncompatibleContext(
            f"context was stored in format version {manifest.format_version}; this build reads version "
            f"{FORMAT_VERSION} (compress the document again)"
        )
    _check_consistent(manifest)
    if expected is not None:
        check_fingerprints(manifest, expected)
    return manifest


def check_fingerprints(manifest: pb.ContextManifest, expected: Fingerprints, context_id: str | None = None) -> None:
    """IncompatibleContext unless the context was built for the `expected` model and adapter."""
    stored = Fingerprints(manifest.model_fingerprint, manifest.adapter_fingerprint)
    if stored != expected:
        which = "context" if context_id is None else f"context {context_id!r}"
        raise IncompatibleContext(
            f"{which} was built for model {stored.model!r} with adapter {stored.adapter!r}; "
            f"this server runs model {expected.model!r} with adapter {expected.adapter!r}"
        )


def decode_retrieval_keys(manifest: pb.ContextManifest, payload: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The verified retrieval keys [B, N, hidden] float32 and token ids [T] int32 of the index part."""
    return check_retrieval_keys(manifest, _load(payload, manifest.retrieval_keys_sha256, "retrieval keys"))


def check_retrieval_keys(
    manifest: pb.ContextManifest, tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval keys and token ids of `tensors` if they have the shapes and dtypes this manifest declares."""
    spec = {
        "retrieval_keys": ((manifest.n_chunks, manifest.nodes_per_chunk, manifest.shapes.hidden), torch.float32),
        "token_ids": ((manifest.n_tokens,), torch.int32),
    }
    tensors = _expect(tensors, "retrieval keys", spec)
    return tensors["retrieval_keys"], tensors["token_ids"]


def decode_node(manifest: pb.ContextManifest, index: int, payload: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The verified keys and values [M, P, kv, hd] of node `index` (chunk * N + node)."""
    return check_node(manifest, index, _load(payload, manifest.node_sha256[index], _node_name(manifest, index)))


def check_node(
    manifest: pb.ContextManifest, index: int, tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of node `index` if they have the shape and dtype this manifest declares."""
    cfg, shapes = manifest.tree_config, manifest.shapes
    spec = ((cfg.n_layers, cfg.pool_size, shapes.n_kv_heads, shapes.head_dim), torch_dtype(manifest))
    tensors = _expect(tensors, _node_name(manifest, index), {"keys": spec, "values": spec})
    return tensors["keys"], tensors["values"]


def _node_name(manifest: pb.ContextManifest, index: int) -> str:
    chunk, node = divmod(index, manifest.nodes_per_chunk)
    return f"node {node} of chunk {chunk}"


def decode(encoded: EncodedContext, expected: Fingerprints | None = None) -> ContextTree:
    """The whole verified tree (tests, migration, embedded use); the decoder reads nodes lazily."""
    manifest = decode_manifest(encoded.manifest_frame, expected)
    if len(encoded.nodes) != len(manifest.node_sha256):
        raise DataCorruption(
            f"context has {len(encoded.nodes)} node payloads, manifest lists {len(manifest.node_sha256)}"
        )
    nodes = [decode_node(manifest, i, payload) for i, payload in enumerate(encoded.nodes)]
    b, n = manifest.n_chunks, manifest.nodes_per_chunk

    def gather(part: int) -> torch.Tensor:
        stacked = torch.stack([node[part] for node in nodes], dim=1)  # [M, B*N, P, kv, hd]
        return stacked.unflatten(1, (b, n))

    retrieval_keys, token_ids = decode_retrieval_keys(manifest, encoded.retrieval_keys)
    return ContextTree(
        config=tree_config(manifest),
        chunk_lengths=tuple(manifest.chunk_lengths),
        keys=gather(0),
        values=gather(1),
        counts=node_counts(manifest).reshape(b, n),
        retrieval_keys=retrieval_keys,
        token_ids=token_ids,
    )


def node_counts(manifest: pb.ContextManifest) -> torch.Tensor:
    """Valid entries per node, flat chunk-major, int32 as in ContextTree.counts."""
    return torch.tensor(manifest.node_entry_counts, dtype=torch.int32)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """A dense copy: safetensors needs contiguous tensors that share no storage."""
    return t.clone(memory_format=torch.contiguous_format)


def _lookup(table: dict[str, int], value: int, field: str) -> str:
    for name, number in table.items():
        if number == value:
            return name
    raise DataCorruption(f"manifest tree_config.{field} has an unknown value {value}")


def _load(payload: bytes, digest: bytes, what: str) -> dict[str, torch.Tensor]:
    if sha256(payload) != digest:
        raise DataCorruption(f"{what} fails its checksum (corrupted or truncated)")
    try:
        return safetensors.torch.load(payload)
    except Exception as exc:  # the parser is third-party: any failure on stored bytes is corruption
        raise DataCorruption(f"{what} is not a readable safetensors payload: {exc}") from exc


def _expect(
    tensors: dict[str, torch.Tensor], what: str, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, torch.Tensor]:
    if set(tensors) != set(spec):
        raise DataCorruption(f"{what} holds tensors {sorted(tensors)}, expected {sorted(spec)}")
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise DataCorruption(f"{what}: {name} is {t.dtype} {tuple(t.shape)}, manifest says {dtype} {shape}")
    return tensors


def _check_encodable(
    tree: ContextTree,
    fingerprints: Fingerprints,
    base_n_layers: int,
    source_sha256: bytes,
    ttl_s: float | None,
) -> None:
    problems = []
    if not fingerprints.model or not fingerprints.adapter:
        problems.append("model and adapter fingerprints must be non-empty")
    if tree.keys.dtype not in DTYPES or tree.values.dtype != tree.keys.dtype:
        problems.append(f"keys/values must share one of {list(DTYPES)}, got {tree.keys.dtype}/{tree.values.dtype}")
    if tree.retrieval_keys.dtype != torch.float32:
        problems.append(f"retrieval keys must be float32, got {tree.retrieval_keys.dtype}")
    if tree.token_ids.dtype != torch.int32 or tree.token_ids.numel() != tree.n_tokens:
        problems.append(
            f"token ids must be int32 [{tree.n_tokens}], got {tree.token_ids.dtype} {tuple(tree.token_ids.shape)}"
        )
    if tree.n_chunks < 1 or not all(1 <= n <= tree.config.chunk_size for n in tree.chunk_lengths):
        problems.append(f"need >= 1 chunk of 1..{tree.config.chunk_size} tokens, got {tree.chunk_lengths}")
    if tree.counts.numel() and not 0 <= int(tree.counts.min()) <= int(tree.counts.max()) <= tree.config.pool_size:
        problems.append(f"node entry counts must lie in [0, {tree.config.pool_size}]")
    if base_n_layers < tree.config.n_layers:
        problems.append(f"base_n_layers ({base_n_layers}) is below the tree's n_layers ({tree.config.n_layers})")
    if len(source_sha256) != DIGEST_BYTES:
        problems.append(f"source_sha256 must be {DIGEST_BYTES} bytes, got {len(source_sha256)}")
    if ttl_s is not None and not ttl_s > 0:
        problems.append(f"ttl_s must be > 0 or None (no expiry), got {ttl_s}")
    if problems:
        raise InvalidInput("cannot encode context tree: " + "; ".join(problems))


def _check_consistent(m: pb.ContextManifest) -> None:
    """Cross-check the manifest's fields, so a reader never indexes out of bounds or misshapes."""
    try:
        cfg = tree_config(m)
    except ConfigError as exc:
        raise DataCorruption(f"manifest tree config is invalid: {exc}") from exc
    n_nodes = m.n_chunks * m.nodes_per_chunk
    digests = (*m.node_sha256, m.retrieval_keys_sha256, m.source_sha256)
    shapes = m.shapes
    problems = [
        text
        for ok, text in (
            (m.n_chunks >= 1 and len(m.chunk_lengths) == m.n_chunks, "chunk count"),
            (all(1 <= n <= cfg.chunk_size for n in m.chunk_lengths), "chunk lengths"),
            (m.n_tokens == sum(m.chunk_lengths), "token count"),
            (m.nodes_per_chunk == cfg.nodes_per_chunk, "nodes per chunk"),
            (len(m.node_entry_counts) == n_nodes and len(m.node_sha256) == n_nodes, "node table size"),
            (all(c <= cfg.pool_size for c in m.node_entry_counts), "node entry counts"),
            (all(len(d) == DIGEST_BYTES for d in digests), "digest lengths"),
            (min(shapes.n_kv_heads, shapes.head_dim, shapes.hidden) >= 1, "tensor shapes"),
            (shapes.base_n_layers >= cfg.n_layers, "base model layers"),
            (m.model_fingerprint != "" and m.adapter_fingerprint != "", "fingerprints"),
            (m.expires_unix_ms == 0 or m.expires_unix_ms > m.created_unix_ms, "expiry"),
        )
        if not ok
    ]
    if problems:
        raise DataCorruption(f"context manifest is inconsistent: {', '.join(problems)}")
    torch_dtype(m)
