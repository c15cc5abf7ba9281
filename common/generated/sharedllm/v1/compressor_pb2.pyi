from sharedllm.common.generated.sharedllm.v1 import context_pb2 as _context_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CompressOptions(_message.Message):
    __slots__ = ("context_id", "ttl_seconds", "pin")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    ttl_seconds: float
    pin: bool
    def __init__(self, context_id: _Optional[str] = ..., ttl_seconds: _Optional[float] = ..., pin: _Optional[bool] = ...) -> None: ...

class CompressRequest(_message.Message):
    __slots__ = ("text", "token_ids", "options")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    token_ids: TokenIds
    options: CompressOptions
    def __init__(self, text: _Optional[bytes] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., options: _Optional[_Union[CompressOptions, _Mapping]] = ...) -> None: ...

class CompressedContext(_message.Message):
    __slots__ = ("context_id", "document_tokens", "chunks", "stored_bytes", "compression_ratio", "bytes_per_token", "kv_cache_ratio", "timings", "reused")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_RATIO_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    document_tokens: int
    chunks: int
    stored_bytes: int
    compression_ratio: float
    bytes_per_token: float
    kv_cache_ratio: float
    timings: CompressTimings
    reused: bool
    def __init__(self, context_id: _Optional[str] = ..., document_tokens: _Optional[int] = ..., chunks: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., bytes_per_token: _Optional[float] = ..., kv_cache_ratio: _Optional[float] = ..., timings: _Optional[_Union[CompressTimings, _Mapping]] = ..., reused: _Optional[bool] = ...) -> None: ...

class CompressTimings(_message.Message):
    __slots__ = ("tokenize_seconds", "compress_seconds", "store_seconds", "total_seconds")
    TOKENIZE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tokenize_seconds: float
    compress_seconds: float
    store_seconds: float
    total_seconds: float
    def __init__(self, tokenize_seconds: _Optional[float] = ..., compress_seconds: _Optional[float] = ..., store_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class CompressResponse(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: CompressedContext
    def __init__(self, context: _Optional[_Union[CompressedContext, _Mapping]] = ...) -> None: ...

class CompressStreamRequest(_message.Message):
    __slots__ = ("options", "text", "token_ids")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    options: CompressOptions
    text: bytes
    token_ids: TokenIds
    def __init__(self, options: _Optional[_Union[CompressOptions, _Mapping]] = ..., text: _Optional[bytes] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class CompressStreamResponse(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: CompressedContext
    def __init__(self, context: _Optional[_Union[CompressedContext, _Mapping]] = ...) -> None: ...

class AppendContextRequest(_message.Message):
    __slots__ = ("context_id", "text", "token_ids")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    text: bytes
    token_ids: TokenIds
    def __init__(self, context_id: _Optional[str] = ..., text: _Optional[bytes] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class AppendContextResponse(_message.Message):
    __slots__ = ("context", "encoded_tokens", "kept_chunks", "encoded_chunks", "bytes_written")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ENCODED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    context: CompressedContext
    encoded_tokens: int
    kept_chunks: int
    encoded_chunks: int
    bytes_written: int
    def __init__(self, context: _Optional[_Union[CompressedContext, _Mapping]] = ..., encoded_tokens: _Optional[int] = ..., kept_chunks: _Optional[int] = ..., encoded_chunks: _Optional[int] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class GetContextRequest(_message.Message):
    __slots__ = ("context_id",)
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    def __init__(self, context_id: _Optional[str] = ...) -> None: ...

class TreeLevel(_message.Message):
    __slots__ = ("level", "nodes", "entries")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    level: int
    nodes: int
    entries: int
    def __init__(self, level: _Optional[int] = ..., nodes: _Optional[int] = ..., entries: _Optional[int] = ...) -> None: ...

class GetContextResponse(_message.Message):
    __slots__ = ("context_id", "model_fingerprint", "adapter_fingerprint", "compatible", "tree_config", "document_tokens", "chunk_lengths", "levels", "stored_bytes", "created_unix_ms", "expires_in_seconds")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    COMPATIBLE_FIELD_NUMBER: _ClassVar[int]
    TREE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    model_fingerprint: str
    adapter_fingerprint: str
    compatible: bool
    tree_config: _context_pb2.TreeConfig
    document_tokens: int
    chunk_lengths: _containers.RepeatedScalarFieldContainer[int]
    levels: _containers.RepeatedCompositeFieldContainer[TreeLevel]
    stored_bytes: int
    created_unix_ms: int
    expires_in_seconds: float
    def __init__(self, context_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., adapter_fingerprint: _Optional[str] = ..., compatible: _Optional[bool] = ..., tree_config: _Optional[_Union[_context_pb2.TreeConfig, _Mapping]] = ..., document_tokens: _Optional[int] = ..., chunk_lengths: _Optional[_Iterable[int]] = ..., levels: _Optional[_Iterable[_Union[TreeLevel, _Mapping]]] = ..., stored_bytes: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., expires_in_seconds: _Optional[float] = ...) -> None: ...

class DeleteContextRequest(_message.Message):
    __slots__ = ("context_id",)
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    def __init__(self, context_id: _Optional[str] = ...) -> None: ...

class DeleteContextResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TouchContextRequest(_message.Message):
    __slots__ = ("context_id", "pin")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    pin: bool
    def __init__(self, context_id: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class TouchContextResponse(_message.Message):
    __slots__ = ("expires_in_seconds",)
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    expires_in_seconds: float
    def __init__(self, expires_in_seconds: _Optional[float] = ...) -> None: ...
