"""Prometheus metrics of a process (`--metrics-port`): names carry their units, labels are bounded
(method names, status codes, job states; never a context id or a tenant).

Services record requests in their interceptor and what each answer or compression measured
(`observe_generate`, `observe_compress`); the batch worker records documents by final state.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from sharedllm.common.engine.results import CompressTimings, Finished

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

REQUESTS = Counter("sharedllm_requests_total", "RPCs served, by method and status code", ["method", "code"])
REQUEST_SECONDS = Histogram(
    "sharedllm_request_duration_seconds", "RPC latency, by method", ["method"], buckets=_LATENCY
)
IN_FLIGHT = Gauge("sharedllm_requests_in_flight", "RPCs being served, by method", ["method"])
QUEUE_SECONDS = Histogram(
    "sharedllm_queue_wait_seconds", "time from a call's arrival to a worker thread starting it", buckets=_LATENCY
)
QUEUED = Gauge("sharedllm_queued_requests", "calls waiting for a slot (admission queue); what autoscaling reads")
REFUSED = Counter(
    "sharedllm_refused_requests_total", "calls refused with RESOURCE_EXHAUSTED: queue full or waited too long"
)
BATCH_ROWS = Gauge("sharedllm_batch_rows", "answers in the decoder's last batched model step")
STEP_SECONDS = Histogram(
    "sharedllm_batch_step_seconds", "one batched decode step of every answer in flight", buckets=_TOKEN
)
PREFIX_BLOCKS_REUSED = Counter(
    "sharedllm_prefix_blocks_reused_total", "prompt blocks a prompt started from instead of reading them"
)
PREFIX_CACHE_BYTES = Gauge("sharedllm_prefix_cache_bytes", "prompt blocks kept for prompts that begin the same way")
TTFT_SECONDS = Histogram(
    "sharedllm_time_to_first_token_seconds", "Generate: from the request to its first token", buckets=_LATENCY
)
INTER_TOKEN_SECONDS = Histogram(
    "sharedllm_inter_token_latency_seconds", "Generate: mean time between tokens of one answer", buckets=_TOKEN
)
COMPRESS_SECONDS = Histogram(
    "sharedllm_compression_duration_seconds", "Compress: tokenise, lower model, store", buckets=_LATENCY
)
TOKENS_COMPRESSED = Counter("sharedllm_compressed_tokens_total", "document tokens compressed")
TOKENS_GENERATED = Counter("sharedllm_generated_tokens_total", "tokens generated")
BYTES_STORED = Counter("sharedllm_store_written_bytes_total", "bytes written to the context store")
BYTES_READ = Counter("sharedllm_store_read_bytes_total", "context bytes read from the store by questions")
CACHE_HITS = Counter("sharedllm_decoded_cache_hit_nodes_total", "selected nodes found in the decoded cache")
INTEGRITY_FAILURES = Counter("sharedllm_integrity_failures_total", "stored data that failed verification (DATA_LOSS)")
DOCUMENTS = Counter("sharedllm_batch_documents_total", "batch documents finished, by final state", ["state"])


def serve(port: int) -> None:
    """Expose /metrics on `port` (0: none)."""
    if port:
        start_http_server(port)


def observe_generate(finished: Finished) -> None:
    t = finished.timings
    TTFT_SECONDS.observe(t.time_to_first_token_s)
    TOKENS_GENERATED.inc(finished.completion_tokens)
    if finished.completion_tokens > 1 and t.decode_s > 0:
        INTER_TOKEN_SECONDS.observe(t.decode_s / (finished.completion_tokens - 1))
    if finished.context is not None:
        BYTES_READ.inc(finished.context.bytes_read)
        CACHE_HITS.inc(finished.context.cached_nodes)


def observe_compress(tokens: int, stored_bytes: int, timings: CompressTimings) -> None:
    COMPRESS_SECONDS.observe(timings.total_s)
    TOKENS_COMPRESSED.inc(tokens)
    BYTES_STORED.inc(stored_bytes)
