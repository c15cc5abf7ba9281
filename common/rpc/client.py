"""The one client of the two services: typed calls in, the runtime's own results out.

`CompressorClient.compress` answers a `CompressOutcome` and `DecoderClient.generate` yields
`TokenDelta` events and one `Finished`, the same types `ContextRuntime` gives an embedded
caller, rebuilt from the messages the servicers write. So `sharedllm generate`, batch workers
and the benchmark send the same request for the same parameters (a field added to
`GenerateRequest` is set here once, and a test checks that every field the servicer reads is),
and code above them does not care whether the model runs in its process or behind a channel.

A failed call raises `RemoteError`, which names the status code and says whether retrying can
help. Channels, credentials and replica round-robin are set up here too.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Self

import grpc
from google.protobuf.message import Message

from sharedllm.common.engine.params import SAMPLING_FIELDS, SamplingParams
from sharedllm.common.engine.results import (
    AppendOutcome,
    Citation,
    CompressOutcome,
    CompressTimings,
    ContextRead,
    Finished,
    GenerateTimings,
    Passage,
    TokenDelta,
)
from sharedllm.common.errors import SharedLLMError
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2, compressor_pb2_grpc, decoder_pb2, decoder_pb2_grpc
from sharedllm.common.rpc.enums import FINISH_REASON_NAMES, GROUNDINGS
from sharedllm.common.rpc.tls import ClientTls

log = logging.getLogger(__name__)

ANSWER_RETRIES = 2  # an answer cut off by a replica's death is asked again this often (reproducible ones)
PIECE_BYTES = 1 << 20  # CompressStream piece size: well under any sensible message limit
PIECE_TOKENS = PIECE_BYTES // 8  # token ids per piece: a varint takes at most 5 bytes, plus framing
# Worth retrying later: the service or its store is unavailable, busy or full right now, or the
# call ran out of time.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)


class RemoteError(SharedLLMError):
    """A call ended with a non-OK status; printed as `CODE: details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def transient(self) -> bool:
        """True when the same call may succeed later (see TRANSIENT_CODES)."""
        return self.code in TRANSIENT_CODES


@contextmanager
def remote_errors() -> Iterator[None]:
    """Turn a failed call into a RemoteError naming its status code and details."""
    try:
        yield
    except grpc.RpcError as exc:
        raise RemoteError(exc.code(), exc.details() or "") from None


def call_metadata(api_key: str | None) -> list[tuple[str, str]]:
    """The metadata that authenticates a call (none without a key)."""
    return [("authorization", f"Bearer {api_key}")] if api_key else []


# Replicas: calls spread round-robin over the addresses a target resolves to, and a call refused
# with UNAVAILABLE (a replica stopping, restarting or still loading its model) is retried on
# another, with backoff, before any response arrived. Streams too large to buffer are not retried.
# AppendContext is never retried by the channel: it is not idempotent (an append that went through
# before its reply was lost would be applied twice), so its caller decides.
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "sharedllm.v1.CompressorService"}, {"service": "sharedllm.v1.DecoderService"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            {"name": [{"service": "sharedllm.v1.CompressorService", "method": "AppendContext"}]},
        ],
    }
)


def channel_target(target: str) -> str:
    """HOST:PORT, several IPv4 HOST:PORT joined by commas (replicas), or any gRPC target URI
    (e.g. dns:///decoder.sharedllm.svc:50052, which resolves to every replica of a headless Service)."""
    if "," in target and ":" in target and "://" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + target
    return target


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """TLS credentials from the client's PEM files, read now (a bad file is a ConfigError here,
    not a failed handshake later)."""
    private_key, certificate_chain = tls.key_pair()
    return grpc.ssl_channel_credentials(tls.root_certificates(), private_key, certificate_chain)


def open_channel(target: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A channel to a service: one address or several replicas (channel_target), in plaintext
    (tls None, the services' default) or over TLS, verifying the server and, with a client
    certificate, proving who the client is (mutual TLS)."""
    options: list[tuple[str, str | int]] = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]
    if tls is None:
        return grpc.insecure_channel(channel_target(target), options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(channel_target(target), channel_credentials(tls), options=options)


def upload(first: Message, document: BinaryIO | Sequence[int]) -> Iterator[Message]:
    """A client stream (CompressStream, AppendContext): `first`, then the document in pieces of
    the same message type (UTF-8 bytes read PIECE_BYTES at a time, or token ids PIECE_TOKENS at a
    time)."""
    yield first
    piece_of = type(first)
    if isinstance(document, Sequence) and not isinstance(document, str | bytes | bytearray | memoryview):
        for start in range(0, len(document), PIECE_TOKENS):
            yield piece_of(token_ids=compressor_pb2.TokenIds(ids=document[start : start + PIECE_TOKENS]))
        return
    for piece in iter(lambda: document.read(PIECE_BYTES), b""):
        yield piece_of(text=piece)


def _readable(document: bytes | bytearray | memoryview | BinaryIO | Sequence[int]) -> BinaryIO | Sequence[int]:
    if isinstance(document, str):
        raise TypeError("the document goes as its UTF-8 bytes, a binary file or token ids, not str")
    if isinstance(document, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(document))
    return document


def compress_outcome(context: compressor_pb2.CompressedContext) -> CompressOutcome:
    """The compressor's reply as the runtime gives it (the inverse of the servicer's message)."""
    t = context.timings
    return CompressOutcome(
        context_id=context.context_id,
        reused=context.reused,
        n_tokens=context.document_tokens,
        chunks=context.chunks,
        stored_bytes=context.stored_bytes,
        bytes_per_token=context.bytes_per_token,
        kv_cache_ratio=context.kv_cache_ratio,
        compression_ratio=context.compression_ratio,
        timings=CompressTimings(t.tokenize_seconds, t.compress_seconds, t.store_seconds, t.total_seconds),
    )


def generate_request(
    context_id: str | Sequence[str],
    prompt: str,
    params: SamplingParams,
    *,
    retrieval: bool = True,
    evidence_tokens: int | None = None,
    evidence_mode: str | None = None,
) -> decoder_pb2.GenerateRequest:
    """The request for the runtime's generate(context_id, prompt, params, ...): every parameter
    explicit (grounding too), so the server's defaults never change what the caller asked for.
    A list of context ids is one question across all of them (one id goes as context_id)."""
    sampling = {name: getattr(params, name) for name in SAMPLING_FIELDS if getattr(params, name) is not None}
    ids = [context_id] if isinstance(context_id, str) else list(context_id)
    request = decoder_pb2.GenerateRequest(
        context_id=ids[0] if len(ids) == 1 else "",
        context_ids=ids if len(ids) > 1 else [],
        prompt=prompt,
        stop=params.stop,
        disable_retrieval=not retrieval,
        grounding=GROUNDINGS[params.grounding],
        **sampling,
    )
    if evidence_tokens is not None:
        request.evidence_tokens = evidence_tokens
    if evidence_mode is not None:
        request.evidence_mode = evidence_mode
    return request


def finished(last: decoder_pb2.GenerateResponse, text: str) -> Finished:
    """The stream's last message as the runtime's Finished (the inverse of the servicer's
    last_message). The wire carries the store reads as one figure, so it is context_load_s here."""
    usage, t = last.usage, last.timings
    return Finished(
        reason=FINISH_REASON_NAMES.get(last.finish_reason, "unspecified"),
        text=text,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        timings=GenerateTimings(
            evidence_s=t.evidence_seconds,
            selection_s=t.selection_seconds,
            context_load_s=t.context_load_seconds,
            prefill_s=t.prefill_seconds,
            time_to_first_token_s=t.time_to_first_token_seconds,
            decode_s=t.decode_seconds,
        ),
        evidence=tuple(
            Passage(p.token_start, p.token_end, p.char_start, p.char_end, p.text, p.score, p.context_id or None)
            for p in last.evidence
        ),
        context=ContextRead(
            usage.context_tokens, usage.context_chunks, usage.context_bytes_read, usage.context_nodes_cached
        ),
        citations=tuple(
            Citation(
                c.answer_start,
                c.answer_end,
                c.char_start,
                c.char_end,
                c.text,
                c.evidence_index if c.HasField("evidence_index") else None,
                c.context_id or None,
            )
            for c in last.citations
        ),
    )


def events(responses: Iterable[decoder_pb2.GenerateResponse]) -> Iterator[TokenDelta | Finished]:
    """A Generate stream as the runtime's events: a TokenDelta per streamed piece, then Finished."""
    text: list[str] = []
    responses = iter(responses)
    for response in responses:
        if response.finish_reason:
            for _ in responses:  # the call's end (nothing follows the last message): its status is OK
                pass
            yield finished(response, "".join(text))
            return
        text.append(response.text)
        yield TokenDelta(response.token_ids[0] if response.token_ids else None, response.text)
    raise RemoteError(grpc.StatusCode.UNKNOWN, "the answer stream ended without its last message")


@dataclass(frozen=True)
class StoredContext:
    """What GetContext says of a stored context."""

    context_id: str
    compatible: bool  # stored by the model and adapter this service runs
    n_tokens: int
    stored_bytes: int
    expires_in_s: float | None  # None: pinned


class ServiceClient:
    """A channel to one service with the caller's credentials and per-call timeout."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: ClientTls | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """timeout_s: the deadline of each call (None: none; a stream's covers all of it)."""
        self.channel = open_channel(target, tls)
        self.metadata = call_metadata(api_key)
        self.timeout_s = timeout_s

    def _call(self, method, request):
        with remote_errors():
            return method(request, metadata=self.metadata, timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CompressorClient(ServiceClient):
    """CompressorService: store documents, look them up, delete them."""

    def __init__(self, target: str, **kwargs) -> None:
        super().__init__(target, **kwargs)
        self.stub = compressor_pb2_grpc.CompressorServiceStub(self.channel)

    def compress(
        self,
        document: bytes | bytearray | memoryview | BinaryIO | Sequence[int],
        *,
        context_id: str | None = None,
        ttl_s: float | None = None,
        pin: bool = False,
    ) -> CompressOutcome:
        """Store a document (UTF-8 bytes, a binary file, or token ids), always streamed, so any
        size within the server's limits goes through. Without context_id the server derives one
        from the document and reuses what it stored for the same one."""
        options = compressor_pb2.CompressOptions(pin=pin)
        if context_id is not None:
            options.context_id = context_id
        if ttl_s is not None:
            options.ttl_seconds = ttl_s
        first = compressor_pb2.CompressStreamRequest(options=options)
        return compress_outcome(self._call(self.stub.CompressStream, upload(first, _readable(document))).context)

    def append(
        self, context_id: str, addition: bytes | bytearray | memoryview | BinaryIO | Sequence[int]
    ) -> AppendOutcome:
        """Grow a stored context by text (UTF-8 bytes or a binary file, joined to its end as it
        is) or token ids, without compressing it all again (AppendContext)."""
        first = compressor_pb2.AppendContextRequest(context_id=context_id)
        reply = self._call(self.stub.AppendContext, upload(first, _readable(addition)))
        return AppendOutcome(
            context=compress_outcome(reply.context),
            encoded_tokens=reply.encoded_tokens,
            kept_chunks=reply.kept_chunks,
            encoded_chunks=reply.encoded_chunks,
            bytes_written=reply.bytes_written,
        )

    def context(self, context_id: str) -> StoredContext:
        """The stored context's description (RemoteError NOT_FOUND when there is none)."""
        info = self._call(self.stub.GetContext, compressor_pb2.GetContextRequest(context_id=context_id))
        expires = info.expires_in_seconds if info.HasField("expires_in_seconds") else None
        return StoredContext(info.context_id, info.compatible, info.document_tokens, info.stored_bytes, expires)

    def delete(self, context_id: str) -> None:
        self._call(self.stub.DeleteContext, compressor_pb2.DeleteContextRequest(context_id=context_id))


class _Diverged(Exception):
    """An answer asked again did not begin with the text already given."""


class DecoderClient(ServiceClient):
    """DecoderService: answers, streamed, and the server's description."""

    def __init__(self, target: str, *, answer_retries: int = ANSWER_RETRIES, **kwargs) -> None:
        """answer_retries: how often an answer cut off by a dying replica is asked again."""
        super().__init__(target, **kwargs)
        self.stub = decoder_pb2_grpc.DecoderServiceStub(self.channel)
        self.answer_retries = answer_retries

    def generate(
        self,
        context_id: str | Sequence[str],
        prompt: str,
        params: SamplingParams,
        *,
        retrieval: bool = True,
        evidence_tokens: int | None = None,
        evidence_mode: str | None = None,
    ) -> Iterator[TokenDelta | Finished]:
        """The answer as ContextRuntime.generate gives it: TokenDelta events, then Finished.
        Closing the iterator early cancels the call, which stops the server's decoding.

        A replica that dies in the middle of an answer (UNAVAILABLE after some text arrived) is
        not the end of it when the answer is reproducible (greedy, or sampled with a seed): the
        request is sent again, the channel picks a live replica, and the text already given is
        checked against the new answer's start and not given twice, so the caller reads one
        whole answer. Up to `answer_retries` times; an answer that could differ is not retried."""
        request = generate_request(
            context_id,
            prompt,
            params,
            retrieval=retrieval,
            evidence_tokens=evidence_tokens,
            evidence_mode=evidence_mode,
        )
        reproducible = params.temperature == 0 or params.seed is not None
        given = ""  # the text the caller has been given so far
        for attempt in range(self.answer_retries + 1):
            received = ""  # this attempt's text
            try:
                for event in self._generate_once(request):
                    if isinstance(event, Finished):
                        yield event
                        return
                    received += event.text
                    if len(received) <= len(given):
                        if not given.startswith(received):
                            raise _Diverged
                        continue
                    if not received.startswith(given):
                        raise _Diverged
                    new = received[len(given) :]
                    given = received
                    yield TokenDelta(event.token_id, new) if new != event.text else event
            except _Diverged:
                raise RemoteError(
                    grpc.StatusCode.ABORTED,
                    "the decoder that was answering stopped, and the answer asked again began differently",
                ) from None
            except RemoteError as exc:
                started = bool(given)
                if exc.code != grpc.StatusCode.UNAVAILABLE or not reproducible or attempt == self.answer_retries:
                    raise
                log.warning("the decoder stopped %s the answer (%s); asking again", "in" if started else "before", exc)

    def _generate_once(self, request: decoder_pb2.GenerateRequest) -> Iterator[TokenDelta | Finished]:
        with remote_errors():
            call = self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s)
            try:
                yield from events(call)
            finally:  # after the last message a no-op; before it, stops the server's decoding
                # A traced channel hands back a generator over the call instead of the call.
                cancel = getattr(call, "cancel", None) or call.close
                cancel()

    def server_info(self) -> decoder_pb2.GetServerInfoResponse:
        """Model, adapter, tree, limits and counters (a status page: kept as the message)."""
        return self._call(self.stub.GetServerInfo, decoder_pb2.GetServerInfoRequest())
