"""The stored format: bit-exact round trips, and every damage reported as the right error."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sharedllm.common.config import TreeConfig
from sharedllm.common.engine.tree import ContextTree
from sharedllm.common.errors import DataCorruption, IncompatibleContext, InvalidInput
from sharedllm.common.generated.sharedllm.v1 import context_pb2 as pb
from sharedllm.common.store import EncodedContext, Fingerprints, decode, encode, full_kv_cache_bytes, storage_report
from sharedllm.common.store.codec import FORMAT_VERSION, decode_manifest, frame_manifest, lifetime_ms, sha256

FP = Fingerprints("model-a", "adapter-a")
SOURCE = hashlib.sha256(b"the document").digest()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def encode_tree(tree: ContextTree, **overrides) -> EncodedContext:
    args = {
        "fingerprints": FP,
        "base_n_layers": 6,
        "tenant": "acme",
        "source_sha256": SOURCE,
        "ttl_s": 60.0,
    }
    return encode(tree, **(args | overrides))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN payloads and -0.0 compare exactly."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_tree(a: ContextTree, b: ContextTree) -> None:
    assert a.config == b.config
    assert a.chunk_lengths == b.chunk_lengths
    for name in ("keys", "values", "retrieval_keys", "token_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(bits(x), bits(y)), name
    assert b.counts.dtype == torch.int32 and torch.equal(a.counts, b.counts)


def with_manifest(encoded: EncodedContext, **fields) -> EncodedContext:
    """A validly framed copy with manifest fields changed: what a buggy writer would store."""
    manifest = pb.ContextManifest()
    manifest.CopyFrom(encoded.manifest)
    for name, value in fields.items():
        field = getattr(manifest, name)
        if hasattr(field, "extend"):
            del field[:]
            field.extend(value)
        else:
            setattr(manifest, name, value)
    return dataclasses.replace(encoded, manifest_frame=frame_manifest(manifest))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(make_tree, dtype):
    tree = make_tree(dtype)
    assert_same_tree(tree, decode(encode_tree(tree), FP))


def test_manifest_records_what_a_reader_needs(make_tree):
    tree = make_tree(torch.bfloat16)
    encoded = encode_tree(tree, ttl_s=2.5, now_ms=1_000)
    m = decode_manifest(encoded.manifest_frame)
    assert m.format_version == FORMAT_VERSION
    assert (m.model_fingerprint, m.adapter_fingerprint, m.tenant) == ("model-a", "adapter-a", "acme")
    assert m.tree_config.depth == tree.config.depth and m.tree_config.pooling == pb.POOLING_LAST
    assert (m.n_chunks, tuple(m.chunk_lengths), m.n_tokens) == (3, tree.chunk_lengths, tree.n_tokens)
    assert m.dtype == pb.TENSOR_DTYPE_BFLOAT16 and m.nodes_per_chunk == tree.config.nodes_per_chunk
    assert (m.shapes.n_kv_heads, m.shapes.head_dim, m.shapes.hidden, m.shapes.base_n_layers) == (2, 8, 12, 6)
    assert list(m.node_entry_counts) == tree.counts.flatten().tolist()
    assert [sha256(node) for node in encoded.nodes] == list(m.node_sha256)
    assert m.retrieval_keys_sha256 == sha256(encoded.retrieval_keys) and m.source_sha256 == SOURCE
    assert (m.created_unix_ms, m.expires_unix_ms, lifetime_ms(m)) == (1_000, 3_500, 2_500)
    assert m.stored_bytes == encoded.nbytes - len(encoded.manifest_frame)
    assert lifetime_ms(encode_tree(tree, ttl_s=None).manifest) is None


def test_payloads_are_plain_safetensors(make_tree):
    tree = make_tree(torch.float16)
    encoded = encode_tree(tree)
    node = safetensors.torch.load(encoded.nodes[4])  # chunk 0, node 4
    assert set(node) == {"keys", "values"}
    assert torch.equal(bits(node["keys"]), bits(tree.keys[:, 0, 4].contiguous()))
    assert node["values"].shape == (tree.config.n_layers, tree.config.pool_size, 2, 8)
    rkeys = safetensors.torch.load(encoded.retrieval_keys)["retrieval_keys"]
    assert torch.equal(rkeys, tree.retrieval_keys)


@pytest.mark.parametrize("expected", [Fingerprints("model-b", "adapter-a"), Fingerprints("model-a", "adapter-b")])
def test_other_model_or_adapter_is_incompatible(make_tree, expected):
    encoded = encode_tree(make_tree())
    with pytest.raises(IncompatibleContext, match="model-a"):
        decode(encoded, expected)


@pytest.mark.parametrize("version", [1, FORMAT_VERSION + 1])
def test_other_format_version_is_incompatible(make_tree, version):
    # Version 1 stored no token ids: reading one must be a clear error, never a tree without text.
    encoded = with_manifest(encode_tree(make_tree()), format_version=version)
    with pytest.raises(IncompatibleContext, match=f"format version {version}; this build reads version 2"):
        decode(encoded, FP)


def test_token_ids_travel_in_the_index_part_and_are_checked(make_tree):
    tree = make_tree()
    encoded = encode_tree(tree)
    stored = safetensors.torch.load(encoded.retrieval_keys)
    assert torch.equal(stored["token_ids"], tree.token_ids) and stored["token_ids"].dtype == torch.int32
    assert len(encoded.retrieval_keys) - tree.retrieval_keys.numel() * 4 < tree.n_tokens * 4 + 256  # 4 B per token
    short = dict(stored, token_ids=stored["token_ids"][:-1])
    payload = safetensors.torch.save(short)
    forged = with_manifest(dataclasses.replace(encoded, retrieval_keys=payload), retrieval_keys_sha256=sha256(payload))
    with pytest.raises(DataCorruption, match="token_ids"):
        decode(forged, FP)


def damage(data: bytes, rng: random.Random, truncate: bool) -> bytes:
    """`data` cut short at a random length, or with one random byte changed."""
    if truncate:
        return data[: rng.randrange(len(data))]
    pos = rng.randrange(len(data))
    return data[:pos] + bytes([data[pos] ^ rng.randrange(1, 256)]) + data[pos + 1 :]


@pytest.mark.parametrize("part", ["manifest_frame", "retrieval_keys", "nodes"])
def test_flipped_bytes_and_truncations_are_corruption(make_tree, part):
    encoded = encode_tree(make_tree(torch.bfloat16))
    rng = random.Random(part)
    for trial in range(40):
        if part == "nodes":
            nodes = list(encoded.nodes)
            i = rng.randrange(len(nodes))
            nodes[i] = damage(nodes[i], rng, truncate=trial % 2 == 1)
            case = dataclasses.replace(encoded, nodes=tuple(nodes))
        else:
            case = dataclasses.replace(encoded, **{part: damage(getattr(encoded, part), rng, truncate=trial % 2 == 1)})
        with pytest.raises(DataCorruption):
            decode(case, FP)


def _payload(**tensors: torch.Tensor) -> bytes:
    return safetensors.torch.save(tensors)


@pytest.mark.parametrize(
    "make_payload",
    [
        lambda k: b"not safetensors at all",
        lambda k: _payload(keys=k, values=k[:, :-1].contiguous()),  # wrong shape
        lambda k: _payload(keys=k, values=k.double()),  # wrong dtype
        lambda k: _payload(keys=k),  # missing tensor
        lambda k: _payload(keys=k, values=k.clone(), extra=k.clone()),  # unexpected tensor
    ],
)
def test_payloads_with_matching_checksums_but_wrong_content_are_corruption(make_tree, make_payload):
    encoded = encode_tree(make_tree())
    payload = make_payload(safetensors.torch.load(encoded.nodes[0])["keys"])
    digests = [sha256(payload), *encoded.manifest.node_sha256[1:]]
    damaged = with_manifest(encoded, node_sha256=digests)
    with pytest.raises(DataCorruption, match="node 0 of chunk 0"):
        decode(dataclasses.replace(damaged, nodes=(payload, *encoded.nodes[1:])), FP)


@pytest.mark.parametrize(
    "fields",
    [
        {"chunk_lengths": [16, 16, 99]},  # longer than a chunk
        {"n_tokens": 1},
        {"nodes_per_chunk": 5},
        {"node_entry_counts": [99] * 18},  # above pool_size
        {"node_sha256": [b"short"] * 18},
        {"dtype": pb.TENSOR_DTYPE_UNSPECIFIED},
        {"model_fingerprint": ""},
    ],
)
def test_inconsistent_manifest_is_corruption(make_tree, fields):
    with pytest.raises(DataCorruption, match="manifest"):
        decode(with_manifest(encode_tree(make_tree()), **fields), FP)


def test_missing_node_payload_is_corruption(make_tree):
    encoded = encode_tree(make_tree())
    with pytest.raises(DataCorruption, match="node payloads"):
        decode(dataclasses.replace(encoded, nodes=encoded.nodes[:-1]), FP)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fingerprints": Fingerprints("", "adapter")}, "fingerprints"),
        ({"source_sha256": b"abc"}, "source_sha256"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"base_n_layers": 1}, "base_n_layers"),
    ],
)
def test_encode_rejects_bad_arguments(make_tree, overrides, message):
    with pytest.raises(InvalidInput, match=message):
        encode_tree(make_tree(), **overrides)


def test_encode_rejects_unsupported_dtype(make_tree):
    tree = make_tree()
    tree.keys, tree.values = tree.keys.double(), tree.values.double()
    with pytest.raises(InvalidInput, match="keys/values"):
        encode_tree(tree)


def test_accounting_against_the_full_kv_cache(make_tree):
    tree = make_tree(torch.float16)
    encoded = encode_tree(tree)
    report = storage_report(encoded.manifest, encoded.nbytes)
    full = 2 * 6 * 2 * 8 * 2 * tree.n_tokens  # keys+values, layers, kv heads, head dim, fp16 bytes, tokens
    assert (
        report.full_kv_cache_bytes
        == full
        == full_kv_cache_bytes(n_tokens=tree.n_tokens, n_layers=6, n_kv_heads=2, head_dim=8, dtype_bytes=2)
    )
    assert report.bytes_per_token == encoded.nbytes / tree.n_tokens
    assert report.kv_cache_ratio == encoded.nbytes / full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_tree_on_the_default_model_stores_about_6_percent_of_its_kv_cache(dtype):
    """SmolLM2-135M (30 layers, 3 kv heads, head 64, hidden 576) with the default TreeConfig
    (M=4, C=1024, D=3, P=32): ratio ~ (N*P/C) * (M/L) = (14*32/1024) * (4/30) = 0.058."""
    config = TreeConfig()
    n, p, m = config.nodes_per_chunk, config.pool_size, config.n_layers
    kv = torch.zeros(m, 1, n, p, 3, 64, dtype=dtype)
    counts = torch.full((1, n), p, dtype=torch.int32)
    tree = ContextTree(
        config, (1024,), kv, kv.clone(), counts, torch.zeros(1, n, 576), torch.zeros(1024, dtype=torch.int32)
    )
    encoded = encode_tree(tree, base_n_layers=30)
    report = storage_report(encoded.manifest, encoded.nbytes)
    print(f"\n{dtype}: {report.bytes_per_token:.0f} B/token, {report.kv_cache_ratio:.4f} of the full KV cache")
    assert report.kv_cache_ratio == pytest.approx((n * p / 1024) * (m / 30), rel=0.05)


def test_generated_protobuf_code_is_up_to_date():
    script = Path(__file__).resolve().parents[1] / "scripts" / "gen_proto.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
