from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_DTYPE_UNSPECIFIED: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT32: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_BFLOAT16: _ClassVar[TensorDtype]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_SINGLE_PASS: _ClassVar[Encoding]
    ENCODING_PER_NODE: _ClassVar[Encoding]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_LAST: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]

class Positions(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITIONS_UNSPECIFIED: _ClassVar[Positions]
    POSITIONS_CHUNK: _ClassVar[Positions]
    POSITIONS_NONE: _ClassVar[Positions]
TENSOR_DTYPE_UNSPECIFIED: TensorDtype
TENSOR_DTYPE_FLOAT32: TensorDtype
TENSOR_DTYPE_FLOAT16: TensorDtype
TENSOR_DTYPE_BFLOAT16: TensorDtype
ENCODING_UNSPECIFIED: Encoding
ENCODING_SINGLE_PASS: Encoding
ENCODING_PER_NODE: Encoding
POOLING_UNSPECIFIED: Pooling
POOLING_LAST: Pooling
POOLING_MEAN: Pooling
POSITIONS_UNSPECIFIED: Positions
POSITIONS_CHUNK: Positions
POSITIONS_NONE: Positions

class TreeConfig(_message.Message):
    __slots__ = ("n_layers", "chunk_size", "depth", "pool_size", "encoding", "pooling", "positions")
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    n_layers: int
    chunk_size: int
    depth: int
    pool_size: int
    encoding: Encoding
    pooling: Pooling
    positions: Positions
    def __init__(self, n_layers: _Optional[int] = ..., chunk_size: _Optional[int] = ..., depth: _Optional[int] = ..., pool_size: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., positions: _Optional[_Union[Positions, str]] = ...) -> None: ...

class TensorShapes(_message.Message):
    __slots__ = ("n_kv_heads", "head_dim", "hidden", "base_n_layers")
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    BASE_N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    n_kv_heads: int
    head_dim: int
    hidden: int
    base_n_layers: int
    def __init__(self, n_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., hidden: _Optional[int] = ..., base_n_layers: _Optional[int] = ...) -> None: ...

class ContextManifest(_message.Message):
    __slots__ = ("format_version", "model_fingerprint", "adapter_fingerprint", "tree_config", "n_chunks", "chunk_lengths", "nodes_per_chunk", "dtype", "shapes", "node_entry_counts", "node_sha256", "retrieval_keys_sha256", "source_sha256", "n_tokens", "tenant", "created_unix_ms", "expires_unix_ms", "stored_bytes")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TREE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    N_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NODES_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    NODE_ENTRY_COUNTS_FIELD_NUMBER: _ClassVar[int]
    NODE_SHA256_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_KEYS_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    model_fingerprint: str
    adapter_fingerprint: str
    tree_config: TreeConfig
    n_chunks: int
    chunk_lengths: _containers.RepeatedScalarFieldContainer[int]
    nodes_per_chunk: int
    dtype: TensorDtype
    shapes: TensorShapes
    node_entry_counts: _containers.RepeatedScalarFieldContainer[int]
    node_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    retrieval_keys_sha256: bytes
    source_sha256: bytes
    n_tokens: int
    tenant: str
    created_unix_ms: int
    expires_unix_ms: int
    stored_bytes: int
    def __init__(self, format_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., adapter_fingerprint: _Optional[str] = ..., tree_config: _Optional[_Union[TreeConfig, _Mapping]] = ..., n_chunks: _Optional[int] = ..., chunk_lengths: _Optional[_Iterable[int]] = ..., nodes_per_chunk: _Optional[int] = ..., dtype: _Optional[_Union[TensorDtype, str]] = ..., shapes: _Optional[_Union[TensorShapes, _Mapping]] = ..., node_entry_counts: _Optional[_Iterable[int]] = ..., node_sha256: _Optional[_Iterable[bytes]] = ..., retrieval_keys_sha256: _Optional[bytes] = ..., source_sha256: _Optional[bytes] = ..., n_tokens: _Optional[int] = ..., tenant: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., stored_bytes: _Optional[int] = ...) -> None: ...
