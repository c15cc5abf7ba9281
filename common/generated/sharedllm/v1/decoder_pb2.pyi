from sharedllm.common.generated.sharedllm.v1 import context_pb2 as _context_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Grounding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUNDING_UNSPECIFIED: _ClassVar[Grounding]
    GROUNDING_QUOTE: _ClassVar[Grounding]
    GROUNDING_FACTS: _ClassVar[Grounding]
    GROUNDING_OFF: _ClassVar[Grounding]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_REPETITION: _ClassVar[FinishReason]
GROUNDING_UNSPECIFIED: Grounding
GROUNDING_QUOTE: Grounding
GROUNDING_FACTS: Grounding
GROUNDING_OFF: Grounding
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_REPETITION: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("context_id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop", "disable_retrieval", "evidence_tokens", "evidence_mode", "grounding", "max_sentences", "loop_guard", "context_ids")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    DISABLE_RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_MODE_FIELD_NUMBER: _ClassVar[int]
    GROUNDING_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    LOOP_GUARD_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_IDS_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    disable_retrieval: bool
    evidence_tokens: int
    evidence_mode: str
    grounding: Grounding
    max_sentences: int
    loop_guard: int
    context_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, context_id: _Optional[str] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., disable_retrieval: _Optional[bool] = ..., evidence_tokens: _Optional[int] = ..., evidence_mode: _Optional[str] = ..., grounding: _Optional[_Union[Grounding, str]] = ..., max_sentences: _Optional[int] = ..., loop_guard: _Optional[int] = ..., context_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("answer_start", "answer_end", "char_start", "char_end", "text", "evidence_index", "context_id")
    ANSWER_START_FIELD_NUMBER: _ClassVar[int]
    ANSWER_END_FIELD_NUMBER: _ClassVar[int]
    CHAR_START_FIELD_NUMBER: _ClassVar[int]
    CHAR_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    answer_start: int
    answer_end: int
    char_start: int
    char_end: int
    text: str
    evidence_index: int
    context_id: str
    def __init__(self, answer_start: _Optional[int] = ..., answer_end: _Optional[int] = ..., char_start: _Optional[int] = ..., char_end: _Optional[int] = ..., text: _Optional[str] = ..., evidence_index: _Optional[int] = ..., context_id: _Optional[str] = ...) -> None: ...

class EvidencePassage(_message.Message):
    __slots__ = ("token_start", "token_end", "char_start", "char_end", "text", "score", "context_id")
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    CHAR_START_FIELD_NUMBER: _ClassVar[int]
    CHAR_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    text: str
    score: float
    context_id: str
    def __init__(self, token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., char_start: _Optional[int] = ..., char_end: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., context_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "context_tokens", "context_chunks", "context_bytes_read", "context_nodes_cached", "evidence_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_NODES_CACHED_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int
    context_chunks: int
    context_bytes_read: int
    context_nodes_cached: int
    evidence_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., context_tokens: _Optional[int] = ..., context_chunks: _Optional[int] = ..., context_bytes_read: _Optional[int] = ..., context_nodes_cached: _Optional[int] = ..., evidence_tokens: _Optional[int] = ...) -> None: ...

class GenerateTimings(_message.Message):
    __slots__ = ("context_load_seconds", "selection_seconds", "prefill_seconds", "time_to_first_token_seconds", "decode_seconds", "evidence_seconds")
    CONTEXT_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    context_load_seconds: float
    selection_seconds: float
    prefill_seconds: float
    time_to_first_token_seconds: float
    decode_seconds: float
    evidence_seconds: float
    def __init__(self, context_load_seconds: _Optional[float] = ..., selection_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., time_to_first_token_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., evidence_seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "timings", "evidence", "citations")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    timings: GenerateTimings
    evidence: _containers.RepeatedCompositeFieldContainer[EvidencePassage]
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[GenerateTimings, _Mapping]] = ..., evidence: _Optional[_Iterable[_Union[EvidencePassage, _Mapping]]] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("window_tokens", "max_document_tokens", "max_prompt_chars", "max_stop_strings", "max_stop_chars", "max_message_bytes", "max_concurrent_requests", "max_queued_requests", "queue_timeout_seconds", "max_batch", "max_contexts_per_question")
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXTS_PER_QUESTION_FIELD_NUMBER: _ClassVar[int]
    window_tokens: int
    max_document_tokens: int
    max_prompt_chars: int
    max_stop_strings: int
    max_stop_chars: int
    max_message_bytes: int
    max_concurrent_requests: int
    max_queued_requests: int
    queue_timeout_seconds: float
    max_batch: int
    max_contexts_per_question: int
    def __init__(self, window_tokens: _Optional[int] = ..., max_document_tokens: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., max_stop_strings: _Optional[int] = ..., max_stop_chars: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_concurrent_requests: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., queue_timeout_seconds: _Optional[float] = ..., max_batch: _Optional[int] = ..., max_contexts_per_question: _Optional[int] = ...) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("active_requests", "requests_total", "generated_tokens_total", "decoded_cache_bytes", "decoded_cache_capacity_bytes", "decoded_cache_hits", "decoded_cache_misses", "queued_requests", "refused_requests_total", "batch_rows", "last_batch_size", "last_step_seconds", "batch_steps_total", "prefix_cache_bytes", "prefix_blocks_reused_total")
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODED_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODED_CACHE_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODED_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    DECODED_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_REUSED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    active_requests: int
    requests_total: int
    generated_tokens_total: int
    decoded_cache_bytes: int
    decoded_cache_capacity_bytes: int
    decoded_cache_hits: int
    decoded_cache_misses: int
    queued_requests: int
    refused_requests_total: int
    batch_rows: int
    last_batch_size: int
    last_step_seconds: float
    batch_steps_total: int
    prefix_cache_bytes: int
    prefix_blocks_reused_total: int
    def __init__(self, active_requests: _Optional[int] = ..., requests_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., decoded_cache_bytes: _Optional[int] = ..., decoded_cache_capacity_bytes: _Optional[int] = ..., decoded_cache_hits: _Optional[int] = ..., decoded_cache_misses: _Optional[int] = ..., queued_requests: _Optional[int] = ..., refused_requests_total: _Optional[int] = ..., batch_rows: _Optional[int] = ..., last_batch_size: _Optional[int] = ..., last_step_seconds: _Optional[float] = ..., batch_steps_total: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_blocks_reused_total: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_fingerprint", "adapter_fingerprint", "adapter_trained", "tree_config", "limits", "stats", "store_url", "usage")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_TRAINED_FIELD_NUMBER: _ClassVar[int]
    TREE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_fingerprint: str
    adapter_fingerprint: str
    adapter_trained: bool
    tree_config: _context_pb2.TreeConfig
    limits: ServerLimits
    stats: ServerStats
    store_url: str
    usage: TenantUsage
    def __init__(self, model_name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., adapter_fingerprint: _Optional[str] = ..., adapter_trained: _Optional[bool] = ..., tree_config: _Optional[_Union[_context_pb2.TreeConfig, _Mapping]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., stats: _Optional[_Union[ServerStats, _Mapping]] = ..., store_url: _Optional[str] = ..., usage: _Optional[_Union[TenantUsage, _Mapping]] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("tenant", "contexts", "stored_bytes", "max_contexts", "max_bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    contexts: int
    stored_bytes: int
    max_contexts: int
    max_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., contexts: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., max_contexts: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...
