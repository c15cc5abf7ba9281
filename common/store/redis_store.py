"""Context store on Redis: shared by every replica, durable with Redis persistence.

Layout, one hash tag per context so that a Redis Cluster keeps all of it in one slot:

    sllm:{<tenant>:<id>}:manifest                      hash: gen -> current generation,
                                                       manifest -> framed manifest
    sllm:{<tenant>:<id>}:<gen>:rkeys                   retrieval-keys payload
    sllm:{<tenant>:<id>}:<gen>:node:<chunk>:<node>     one node payload
    sllm:{<tenant>:<id>}:retired                       hash: replaced generation -> its manifest
    sllm:usage:{<tenant>}                              hash: context id -> stored bytes (quotas)

Why generations: a writer stages every part under a fresh random generation, then one Lua
script checks that they all exist and points the manifest key at them. Readers follow that
pointer, so they never see a partly written tree, and two writers of one id never mix: the
last to publish wins whole. The replaced generation expires after a grace period, so a reader
that already holds its manifest can still fetch its nodes; `delete` removes it at once.

Appends (`put(..., replaces=version)`): an appended version keeps the earlier chunks' nodes where
the generation that wrote them has them, and its manifest key's `layout` field names the
generation of each chunk (absent: every part is the current generation's). Its publish goes
through only if the current manifest is still the version it extends (else ContextChanged, and
the appender reads the newer version and appends again); the grace period after it spares the
parts it keeps; a failed append puts the version it extended back.

Expiry: the manifest key expires after the context's lifetime and its parts PART_MARGIN_MS
later, so parts exist whenever the manifest does; every use restarts all of them in one script,
and pinning removes the expiry of all of them. Run Redis with `maxmemory-policy noeviction`:
an evicted part is lost data, which reads then report as DataCorruption.

Usage: a tenant's index of stored sizes is written with each context and removed with it. It
lives in the tenant's own slot, so it is updated beside the context's writes, not in their
script. A context that expires leaves its entry behind until the index is next summed for a
quota or a usage report; then the entries of contexts that no longer exist are dropped.

Replicas (`min_replicas`): Redis replicates asynchronously, so a context acknowledged by the
primary can vanish if the primary dies before its replicas have it and one of them takes over.
With min_replicas = N, a put publishes and then runs WAIT N on the same connection: Redis
answers once N replicas have acknowledged everything this connection wrote (the replication
stream is one ordered log, so the staged parts written before are covered too), or when the
timeout passes. Fewer than N: the context is removed again (an earlier version under its id
with it) and the put fails as StoreUnavailable, so a caller never holds an acknowledgement for a
context that lives on the primary alone. (WAIT does not make a write survive the loss of every
copy, nor fsync it: for that, AOF with appendfsync always on the replicas.)

Timeouts: a call waits at most `timeout_s` for Redis to answer and is tried `retries` more times,
so a frozen or vanished Redis frees a worker in seconds (UNAVAILABLE), never minutes.

Redis Cluster: a `redis+cluster://host:port` URL (`rediss+cluster://` with TLS) names any one
node; the client learns the others and follows MOVED/ASK redirections. Every key of a context
shares its hash tag, so every script, transaction and multi-key read stays on one node. While
slots migrate (a resharding) or a primary fails over, a call the client cannot complete after
its retries is StoreUnavailable: retryable, and nothing stored is lost (docs/architecture.md §5).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from sharedllm.common.errors import (
    ContextChanged,
    ContextNotFound,
    DataCorruption,
    IncompatibleContext,
    InvalidInput,
    ResourceExhausted,
    StoreUnavailable,
)
from sharedllm.common.generated.sharedllm.v1 import context_pb2 as pb
from sharedllm.common.store import codec
from sharedllm.common.store.base import ContextKey, ContextStore, PartReader, StoreStats
from sharedllm.common.store.codec import EncodedContext
from sharedllm.common.store.quota import Quota, TenantUsage

log = logging.getLogger(__name__)

# Parts of a generation not yet published expire this soon: a writer that fails removes them at
# once, and one that dies (or cannot reach Redis to clean up) leaves them only this long.
STAGING_TTL_MS = 300_000
PART_MARGIN_MS = 60_000  # parts outlive their manifest key by this much
WRITE_HEADROOM = 0.95  # a Redis this full of its maxmemory takes no new context: a compressor is NOT_SERVING
GRACE_MS = 60_000  # a replaced generation stays readable this long
_GENERATION = re.compile(rb"[0-9a-f]{16}")
_LAYOUT = re.compile(rb"(?:[0-9a-f]{16})+")
_INCOMPLETE = "SLLM_INCOMPLETE"
_CHANGED = "SLLM_CHANGED"
_GONE = "SLLM_GONE"
# In the retired hash, beside a replaced generation's manifest: its layout, if it had one.
_LAYOUT_SUFFIX = ":layout"

DEFAULT_TIMEOUT_S = 3.0  # per answer; the replies to a 361 MB write (a 128K-token context) start within ~1 s
DEFAULT_RETRIES = 1
# A cluster client retries longer: a failover or a slot migration takes seconds.
DEFAULT_CLUSTER_RETRIES = 5
DEFAULT_REPLICA_TIMEOUT_S = 5.0  # WAIT's bound: replicas take a 128K-token context (361 MB) in about a second or two
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Redirections and refusals while a cluster changes shape: worth retrying, nothing is lost.
_CLUSTER_CHANGING = (
    redis.exceptions.ClusterError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.SlotNotCoveredError,
)

# KEYS[1] manifest key, KEYS[2] retired-generations hash, KEYS[3..] parts; ARGV: generation,
# manifest frame, lifetime ms (0: none), part margin ms, grace ms, the version replaced (the
# digest its frame opens with; '': any), the layout ('': every part under the generation).
# Records the replaced generation as retired and returns its {generation, manifest frame, layout}
# (nils if there was none).
_PUBLISH = f"""
local old = redis.call('HMGET', KEYS[1], 'gen', 'manifest', 'layout')
if ARGV[6] ~= '' then
  if not old[2] then return redis.error_reply('{_GONE}') end
  if string.sub(old[2], 1, {codec.DIGEST_BYTES}) ~= ARGV[6] then return redis.error_reply('{_CHANGED}') end
end
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    return redis.error_reply('{_INCOMPLETE} ' .. KEYS[i])
  end
end
redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'manifest', ARGV[2])
if ARGV[7] == '' then redis.call('HDEL', KEYS[1], 'layout') else redis.call('HSET', KEYS[1], 'layout', ARGV[7]) end
if old[1] and old[1] ~= ARGV[1] then
  redis.call('HSET', KEYS[2], old[1], old[2] or '')
  if old[3] then redis.call('HSET', KEYS[2], old[1] .. '{_LAYOUT_SUFFIX}', old[3]) end
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
local ttl = tonumber(ARGV[3])
if ttl == 0 then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ttl) end
for i = 3, #KEYS do
  if ttl == 0 then
    redis.call('PERSIST', KEYS[i])
  else
    redis.call('PEXPIRE', KEYS[i], ttl + tonumber(ARGV[4]))
  end
end
return old
"""

# A tenant's usage hash maps context id -> "<stored bytes>:<unix ms>", with ":pending" appended
# while the context is being written (its manifest does not exist yet, so pruning must not take
# it for an expired one).
#
# KEYS[1] the usage hash; ARGV: context id, the pending value, its bytes, max contexts (0: none),
# max bytes (0: none). Records the context unless that would pass a limit (the context it
# replaces does not count); without limits it only records. Returns {recorded (1/0), contexts,
# bytes (the usage without this context; 0, 0 without limits), the replaced value or false}.
_RESERVE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local max_contexts, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
if max_contexts == 0 and max_bytes == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return {1, 0, 0, old or false}
end
local count = redis.call('HLEN', KEYS[1])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(string.match(v, '^%d+')) end
if old then
  count = count - 1
  total = total - tonumber(string.match(old, '^%d+'))
end
if (max_contexts > 0 and count + 1 > max_contexts) or (max_bytes > 0 and total + tonumber(ARGV[3]) > max_bytes) then
  return {0, count, total, old or false}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, count, total, old or false}
"""

# Undo a write that was not acknowledged: its staged parts go, and its manifest too if it was
# published (the reply may have been lost after the script ran) and is still the current one. An
# append puts back the version it extended instead (ARGV[2..4]: its generation, manifest frame and
# layout), whose parts it never touched, so a failed append loses nothing that was stored.
# If a newer version already keeps chunks of this write (an append read it before the undo), its
# parts stay: removing them would break that version.
# KEYS[1] manifest key, KEYS[2..] staged parts; ARGV[1] the write's generation.
_UNDO = """
local current = redis.call('HMGET', KEYS[1], 'gen', 'layout')
if current[1] == ARGV[1] then
  if ARGV[2] ~= '' then
    redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'manifest', ARGV[3])
    if ARGV[4] == '' then redis.call('HDEL', KEYS[1], 'layout') else redis.call('HSET', KEYS[1], 'layout', ARGV[4]) end
  else
    redis.call('UNLINK', KEYS[1])
  end
elseif current[2] and string.find(current[2], ARGV[1], 1, true) then
  return 0
end
if #KEYS > 1 then redis.call('UNLINK', unpack(KEYS, 2)) end
return 1
"""

# KEYS[1] the usage hash; ARGV: context id, the value expected, the new value ('': remove).
# Changes the entry only if it still holds the value expected, so a writer never undoes or
# prunes what a concurrent writer of the same id recorded since. Returns 1 if it changed.
_SWAP = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""
USAGE_SAMPLE = 8  # usage entries checked for expired contexts after each write

# KEYS[1] manifest key, KEYS[2] retrieval keys, KEYS[3..] nodes; ARGV: generation,
# mode ('use' | 'check' | 'touch' | 'pin'), lifetime ms, part margin ms.
# Returns {status, retrieval-keys payload ('use') or whether that part exists ('check')}.
# Status 0: the manifest key no longer points at this generation (deleted, expired or
# replaced); 1: expiry restarted or removed; 2: no expiry to restart.
_EXPIRE = """
local status = 0
if redis.call('HGET', KEYS[1], 'gen') == ARGV[1] then
  if ARGV[2] == 'pin' then
    for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
    status = 1
  elseif redis.call('PTTL', KEYS[1]) < 0 then
    status = 2
  else
    local ttl = tonumber(ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ttl)
    for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl + tonumber(ARGV[4])) end
    status = 1
  end
end
if ARGV[2] == 'use' then return {status, redis.call('GET', KEYS[2])} end
if ARGV[2] == 'check' then return {status, redis.call('EXISTS', KEYS[2])} end
return {status}
"""


def redact(url: str) -> str:
    """The URL without its password (in messages, logs and metrics)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    if parts.password is not None:
        host = f"{parts.username or ''}:***@{host}"
    elif parts.username:
        host = f"{parts.username}@{host}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, "***" if "password" in k.lower() else v) for k, v in query]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, urllib.parse.urlencode(query, safe="*"), ""))


@dataclass(frozen=True)
class _Keys:
    """Key names of one context."""

    prefix: str

    @classmethod
    def of(cls, key: ContextKey) -> _Keys:
        return cls(f"sllm:{{{key.tenant}:{key.context_id}}}")

    @property
    def head(self) -> str:
        return f"{self.prefix}:manifest"

    @property
    def retired(self) -> str:
        """Hash of replaced generations still in their grace period: generation -> manifest frame."""
        return f"{self.prefix}:retired"

    def rkeys(self, gen: str) -> str:
        return f"{self.prefix}:{gen}:rkeys"

    def node(self, version: _Version, index: int, nodes_per_chunk: int) -> str:
        chunk, node = divmod(index, nodes_per_chunk)
        return f"{self.prefix}:{version.chunk_generation(chunk)}:node:{chunk}:{node}"

    def parts(self, version: _Version, manifest: pb.ContextManifest) -> list[str]:
        """Every part of a version: retrieval keys first, then nodes in chunk-major order."""
        n = manifest.nodes_per_chunk
        return [self.rkeys(version.gen), *(self.node(version, i, n) for i in range(manifest.n_chunks * n))]


@dataclass(frozen=True)
class _Version:
    """One published version of a context: its generation, manifest frame and layout.

    layout: the generation that holds each chunk's nodes, where an append kept earlier chunks as
    an older generation wrote them (None: every part is the generation's own).
    """

    gen: str
    frame: bytes = b""
    layout: tuple[str, ...] | None = None

    def chunk_generation(self, chunk: int) -> str:
        if self.layout is None:
            return self.gen
        if chunk >= len(self.layout):
            raise DataCorruption(f"a context's layout names {len(self.layout)} chunks; its manifest has more")
        return self.layout[chunk]

    @staticmethod
    def parse_layout(raw: bytes | None) -> tuple[str, ...] | None:
        if raw is None:
            return None
        if len(raw) % 16 or not _LAYOUT.fullmatch(raw):
            raise DataCorruption(f"a context's layout field is damaged ({len(raw)} bytes)")
        text = raw.decode()
        return tuple(text[i : i + 16] for i in range(0, len(text), 16))

    def layout_field(self) -> str:
        return "" if self.layout is None else "".join(self.layout)


class RedisStore(ContextStore):
    """Thread-safe (one connection pool per node). URL: redis://[[user]:password@]host[:port][/db][?opts],
    rediss:// for TLS (e.g. ?ssl_ca_certs=/path/ca.pem), redis+cluster:// or rediss+cluster://
    for a Redis Cluster (any one node); options are redis-py's."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int | None = None,
        min_replicas: int = 0,
        replica_timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S,
    ) -> None:
        """timeout_s: longest wait for an answer (and for a connection); retries: further tries of a
        call that timed out or lost its connection (None: 1, or 5 on a cluster); min_replicas: the
        replicas a stored context must reach before put returns, within replica_timeout_s."""
        super().__init__()
        if min_replicas < 0 or (min_replicas and not (math.isfinite(replica_timeout_s) and replica_timeout_s > 0)):
            raise InvalidInput(
                f"min_replicas must be >= 0 and the replica timeout > 0, got {min_replicas} and {replica_timeout_s}"
            )
        self.min_replicas, self.replica_timeout_s = min_replicas, replica_timeout_s
        scheme = urllib.parse.urlsplit(url).scheme
        cluster = scheme in CLUSTER_SCHEMES
        retries = (DEFAULT_CLUSTER_RETRIES if cluster else DEFAULT_RETRIES) if retries is None else retries
        if not (timeout_s > 0 and retries >= 0):
            raise InvalidInput(f"store timeout must be > 0 and retries >= 0, got {timeout_s} and {retries}")
        # Options in the URL's query string take precedence over these.
        options = {
            "socket_connect_timeout": timeout_s,
            # WAIT answers only after its own timeout: a socket that gave up first would cut it off.
            "socket_timeout": timeout_s + (replica_timeout_s if min_replicas else 0.0),
            "retry": Retry(ExponentialBackoff(cap=1.0 if cluster else 0.5, base=0.1 if cluster else 0.05), retries),
        }
        try:
            if cluster:
                node = CLUSTER_SCHEMES[scheme] + url[len(scheme) :]
                self._redis: redis.Redis | RedisCluster = RedisCluster.from_url(node, **options)
            else:
                pool = redis.ConnectionPool.from_url(url, health_check_interval=30, **options)
                self._redis = redis.Redis(connection_pool=pool)
        except ValueError as exc:  # redis-py's messages name the bad part, never the password
            raise InvalidInput(f"invalid Redis URL: {exc}") from exc
        except (redis.ConnectionError, redis.TimeoutError, *_CLUSTER_CHANGING) as exc:  # asked for its nodes
            raise StoreUnavailable(f"Redis Cluster at {redact(url)} is unavailable: {exc}") from exc
        self.url = redact(url)
        self._publish = self._redis.register_script(_PUBLISH)
        self._expire = self._redis.register_script(_EXPIRE)
        self._reserve = self._redis.register_script(_RESERVE)
        self._swap = self._redis.register_script(_SWAP)
        self._undo_script = self._redis.register_script(_UNDO)

    def ping(self, *, writes: bool = False) -> None:
        """A PING answers reads; a Redis still loading its dataset answers PING but nothing else, and
        one at its memory limit takes no new context: health must say so (INFO on one server)."""
        with self._errors():
            self._redis.ping()
            if isinstance(self._redis, RedisCluster):
                return  # INFO answers per node there; a node that cannot take writes fails the write
            info = self._redis.info()
        if info.get("loading"):
            raise StoreUnavailable(f"Redis at {self.url} is loading its dataset; retry shortly")
        limit = int(info.get("maxmemory", 0))
        if writes and limit and int(info.get("used_memory", 0)) >= WRITE_HEADROOM * limit:
            raise ResourceExhausted(
                f"Redis at {self.url} uses {int(info['used_memory'])} of its {limit} bytes; a context would not fit"
            )

    def close(self) -> None:
        self._redis.close()
        if isinstance(self._redis, redis.Redis):
            self._redis.connection_pool.disconnect()

    def stats(self) -> StoreStats:
        return StoreStats(self.url, None, None, None, self._counters.snapshot())

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn redis-py's exceptions into the product's error vocabulary."""
        try:
            yield
        except redis.exceptions.BusyLoadingError as exc:  # restarted, reading its dataset back from disk
            raise StoreUnavailable(f"Redis at {self.url} is loading its dataset; retry in a few seconds") from exc
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError) as exc:
            raise StoreUnavailable(f"Redis at {self.url} is unavailable ({type(exc).__name__}: {exc})") from exc
        except _CLUSTER_CHANGING as exc:
            raise StoreUnavailable(
                f"Redis Cluster at {self.url} is changing shape ({type(exc).__name__}: {exc}); retry"
            ) from exc
        except redis.exceptions.OutOfMemoryError as exc:
            raise ResourceExhausted(f"Redis at {self.url} is out of memory: {exc}") from exc
        except redis.ResponseError as exc:
            if _CHANGED in str(exc):
                raise ContextChanged(f"a context in Redis at {self.url} was replaced meanwhile") from exc
            if _GONE in str(exc):
                raise ContextNotFound("the context was deleted or expired while a new version was written") from exc
            if _INCOMPLETE in str(exc):
                raise DataCorruption(
                    f"staged parts vanished before publishing ({exc}); is Redis evicting keys? "
                    "It must run with maxmemory-policy noeviction"
                ) from exc
            if "WRONGTYPE" in str(exc):
                raise DataCorruption(f"a context key in Redis at {self.url} has the wrong type: {exc}") from exc
            raise

    def _put(self, key: ContextKey, encoded: EncodedContext, quota: Quota, replaces: bytes | None) -> None:
        keys, manifest, gen = _Keys.of(key), encoded.manifest, secrets.token_hex(8)
        version, base = _Version(gen), None
        if replaces is not None:  # an append: a failed write puts this version back
            base = self._current_version(key, keys)
            if base.frame[: codec.DIGEST_BYTES] != replaces:
                raise ContextChanged(f"context {key.context_id!r} was replaced meanwhile")
        if encoded.kept_nodes:  # the kept chunks stay where the version it extends has them
            assert base is not None
            kept_chunks = encoded.kept_nodes // manifest.nodes_per_chunk
            layout = [base.chunk_generation(c) for c in range(kept_chunks)]
            version = _Version(gen, layout=(*layout, *[gen] * (manifest.n_chunks - kept_chunks)))
        parts = keys.parts(version, manifest)
        staged = [parts[0], *parts[1 + encoded.kept_nodes :]]  # written by this put; the rest are kept
        pending, replaced = self._record_usage(key, encoded.nbytes, quota)
        with self._errors():
            try:
                pipe = self._redis.pipeline(transaction=False)
                for name, payload in zip(staged, (encoded.retrieval_keys, *encoded.nodes), strict=True):
                    pipe.set(name, payload, px=STAGING_TTL_MS)
                pipe.execute()
                old = self._published(
                    keys,
                    parts,
                    [
                        gen,
                        encoded.manifest_frame,
                        codec.lifetime_ms(manifest) or 0,
                        PART_MARGIN_MS,
                        GRACE_MS,
                        replaces or b"",
                        version.layout_field(),
                    ],
                )
            except _TooFewReplicas as exc:
                self._undo(keys, gen, staged, base)  # published on the primary alone: undone
                self._swap_usage(key, pending, (replaced or b"") if base is not None else b"")
                raise StoreUnavailable(str(exc)) from None
            except BaseException:
                # Not acknowledged, so not stored: a full Redis must not stay full of it, and a
                # manifest published before its reply was lost must not point at parts that go.
                self._undo(keys, gen, staged, base)
                self._swap_usage(key, pending, replaced or b"")  # unless another writer recorded since
                raise
        # Published: what follows only tidies up, so a failure here is logged, never reported as a
        # failed write (a caller told so would write again: an append would be applied twice).
        self._swap_usage(key, pending, pending.removesuffix(b":pending"))  # published: no longer pending
        try:
            old_gen, old_frame, old_layout = old
            if old_gen is not None and old_gen != gen.encode():
                kept = set(parts)
                pipe = self._redis.pipeline(transaction=False)
                for name in self._parts_of(keys, old_gen, old_frame, old_layout):
                    if name not in kept:
                        pipe.pexpire(name, GRACE_MS)
                pipe.execute()
            if not quota.limited:
                self._prune_usage(key.tenant, sample=USAGE_SAMPLE)  # keeps the index from growing with expiries
        except (redis.RedisError, StoreUnavailable) as exc:
            log.warning("context %s stored; tidying up after it failed (%s): old parts expire with their TTL",
                        key.context_id, exc)  # fmt: skip

    def _current_version(self, key: ContextKey, keys: _Keys) -> _Version:
        with self._errors():
            head = self._redis.hgetall(keys.head)
        return _current(key, head)

    def _published(self, keys: _Keys, parts: list[str], args: list) -> list:
        """Run the publish script; with min_replicas, then WAIT on the same connection (the node
        that holds the context's slot, on a cluster), raising _TooFewReplicas if they fall short."""
        if not self.min_replicas:
            return self._publish(keys=[keys.head, keys.retired, *parts], args=args)
        node = self._redis
        if isinstance(node, RedisCluster):
            node = node.get_redis_connection(node.get_node_from_key(keys.head))
        pipe = node.pipeline(transaction=False)
        self._publish(keys=[keys.head, keys.retired, *parts], args=args, client=pipe)
        pipe.execute_command("WAIT", self.min_replicas, max(1, round(self.replica_timeout_s * 1000)))
        old, acknowledged = pipe.execute()
        if acknowledged < self.min_replicas:
            raise _TooFewReplicas(
                f"the context reached {acknowledged} of {self.min_replicas} replicas within "
                f"{self.replica_timeout_s} s, so it was not stored; retry, or check the replicas of {self.url}"
            )
        return old

    def _record_usage(self, key: ContextKey, nbytes: int, quota: Quota) -> tuple[bytes, bytes | None]:
        """Count the context in its tenant's usage as pending, within the quota; returns the value
        recorded and the one it replaced (None: none). Over the quota, the entries of contexts that
        have expired are dropped and the count is tried once more before QuotaExceeded."""
        pending = f"{nbytes}:{int(time.time() * 1000)}:pending".encode()
        args = [key.context_id, pending, nbytes, quota.max_contexts or 0, quota.max_bytes or 0]
        for attempt in range(2):
            with self._errors():
                recorded, contexts, stored, replaced = self._reserve(keys=[_usage_key(key.tenant)], args=args)
            if recorded:
                return pending, replaced or None
            if attempt == 0:
                self._prune_usage(key.tenant)
        quota.check(key.tenant, TenantUsage(contexts, stored), nbytes)  # raises QuotaExceeded with the numbers
        raise AssertionError("the usage script and Quota.check disagree")  # pragma: no cover

    def _swap_usage(self, key: ContextKey, expected: bytes, new: bytes) -> None:
        """Set (or with b"" remove) the context's usage entry if it still holds `expected`; best
        effort: an entry left behind is pruned later."""
        try:
            self._swap(keys=[_usage_key(key.tenant)], args=[key.context_id, expected, new])
        except redis.RedisError as exc:
            log.warning("could not update the usage entry of %s (%s); it is pruned later", key.context_id, exc)

    def _usage(self, tenant: str, excluding: str | None) -> TenantUsage:
        sizes = {c: size for c, size in self._prune_usage(tenant).items() if c != excluding}
        return TenantUsage(len(sizes), sum(sizes.values()))

    def _prune_usage(self, tenant: str, sample: int | None = None) -> dict[str, int]:
        """Drop the usage entries of contexts that no longer exist: published ones whose manifest
        is gone (expired), and pending ones older than a write may take (their writer died).
        Looks at every entry, or at `sample` random ones; returns the sizes of those kept."""
        usage, now_ms = _usage_key(tenant), time.time() * 1000
        with self._errors():
            if sample is None:
                entries = self._redis.hgetall(usage)
            else:
                pairs = self._redis.hrandfield(usage, sample, withvalues=True) or []
                entries = dict(zip(pairs[::2], pairs[1::2], strict=True))
            pipe = self._redis.pipeline(transaction=False)
            for context_id in entries:
                pipe.exists(_Keys.of(ContextKey(tenant, context_id.decode())).head)
            exists = pipe.execute()
            kept, gone = {}, []
            for (context_id, value), live in zip(entries.items(), exists, strict=True):
                size, stamp, *pending = value.split(b":")
                dead = now_ms - int(stamp) > STAGING_TTL_MS if pending else not live
                if dead:
                    gone.append((context_id, value))
                else:
                    kept[context_id.decode()] = int(size)
            for context_id, value in gone:  # one by one: a cluster pipeline takes no scripts
                self._swap(keys=[usage], args=[context_id, value, b""])
        return kept

    def _undo(self, keys: _Keys, gen: str, parts: list[str], restore: _Version | None = None) -> None:
        """Remove what a failed write staged, and its manifest if that went out and is still the
        current one (an append puts back `restore`, the version it extended); best effort
        (staged parts left behind expire with STAGING_TTL_MS)."""
        previous = [restore.gen, restore.frame, restore.layout_field()] if restore is not None else ["", "", ""]
        try:
            self._undo_script(keys=[keys.head, *parts], args=[gen, *previous])
        except redis.RedisError as exc:
            log.warning("could not remove %d staged parts of a failed write (%s); they expire within %d s",
                        len(parts), exc, STAGING_TTL_MS // 1000)  # fmt: skip

    def _open(self, key: ContextKey) -> tuple[bytes, PartReader]:
        keys = _Keys.of(key)
        version = self._current_version(key, keys)
        return version.frame, _Generation(self, key, keys, version)

    def _info(self, key: ContextKey) -> tuple[bytes, float | None]:
        keys = _Keys.of(key)
        with self._errors():
            pipe = self._redis.pipeline(transaction=True)
            head, pttl = pipe.hgetall(keys.head).pttl(keys.head).execute()
        return _current(key, head).frame, None if pttl < 0 else pttl / 1000

    def _touch(self, key: ContextKey, pin: bool) -> None:
        keys = _Keys.of(key)
        for _ in range(3):  # a concurrent writer may replace the generation between the two calls
            version = self._current_version(key, keys)
            manifest = codec.decode_manifest(version.frame)
            status, *_ = self._expire_script(keys, version, manifest, "pin" if pin else "touch")
            if status:
                return
        raise StoreUnavailable(f"context {key.context_id!r} is being rewritten concurrently; retry")

    def _delete(self, key: ContextKey) -> bool:
        """Remove the current generation and any replaced one still in its grace period."""
        keys = _Keys.of(key)
        with self._errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hgetall(keys.head)
            pipe.hgetall(keys.retired)
            pipe.execute_command("UNLINK", keys.head, keys.retired)  # one slot: a cluster pipeline takes it as is
            head, retired, _ = pipe.execute()
            generations = [(head.get(b"gen"), head.get(b"manifest"), head.get(b"layout"))] if head else []
            generations += [
                (gen, frame, retired.get(gen + _LAYOUT_SUFFIX.encode()))
                for gen, frame in retired.items()
                if not gen.endswith(_LAYOUT_SUFFIX.encode())
            ]
            parts = list(
                dict.fromkeys(part for generation in generations for part in self._parts_of(keys, *generation))
            )
            if parts:
                self._redis.unlink(*parts)
            usage = self._redis.hget(_usage_key(key.tenant), key.context_id)
        if head and usage is not None and not usage.endswith(b":pending"):  # not a concurrent writer's
            self._swap_usage(key, usage, b"")
        return bool(head)

    def _expire_script(self, keys: _Keys, version: _Version, manifest: pb.ContextManifest, mode: str) -> list:
        with self._errors():
            return self._expire(
                keys=[keys.head, *keys.parts(version, manifest)],
                args=[version.gen, mode, codec.lifetime_ms(manifest) or 0, PART_MARGIN_MS],
            )

    def _parts_of(self, keys: _Keys, gen: bytes | None, frame: bytes | None, layout: bytes | None) -> list[str]:
        """The parts of a version, to expire or delete them once it is no longer current.

        Its manifest and layout name them; if those are unreadable, the generation's own parts
        are found by name with a SCAN (a walk over the whole keyspace, acceptable only in this
        rare case; kept parts of older generations then expire with them).
        """
        if gen is None or not _GENERATION.fullmatch(gen):
            log.warning("context %s has no valid generation; its parts are left to expire", keys.prefix)
            return []
        try:
            version = _Version(gen.decode(), frame or b"", _Version.parse_layout(layout))
            return keys.parts(version, codec.decode_manifest(frame or b""))
        except (DataCorruption, IncompatibleContext):
            return [k.decode() for k in self._redis.scan_iter(match=f"{keys.prefix}:{gen.decode()}:*", count=1000)]


class _TooFewReplicas(Exception):
    """A published context did not reach min_replicas in time (undone, then StoreUnavailable)."""


def _usage_key(tenant: str) -> str:
    return f"sllm:usage:{{{tenant}}}"


def _current(key: ContextKey, head: dict[bytes, bytes]) -> _Version:
    """The current version named by a manifest key's fields."""
    if not head:
        raise key.not_found()
    gen, frame = head.get(b"gen"), head.get(b"manifest")
    if gen is None or frame is None or not _GENERATION.fullmatch(gen):
        raise DataCorruption(f"manifest key of context {key.context_id!r} is damaged (fields {sorted(head)})")
    return _Version(gen.decode(), frame, _Version.parse_layout(head.get(b"layout")))


@dataclass(frozen=True)
class _Generation:
    """The parts of the version a reader opened."""

    store: RedisStore
    key: ContextKey
    keys: _Keys
    version: _Version

    def use(self, manifest: pb.ContextManifest, *, read_retrieval_keys: bool) -> bytes | None:
        """One script restarts every part's expiry (and reads the retrieval keys if asked).

        A version replaced since it was opened stays readable for its grace period, like a
        snapshot; only a missing payload is an error.
        """
        mode = "use" if read_retrieval_keys else "check"
        status, part = self.store._expire_script(self.keys, self.version, manifest, mode)
        if part is None or part == 0:  # GET found nothing, or EXISTS said 0
            if status == 0:
                raise self.key.not_found("deleted or expired while being opened")
            raise DataCorruption(f"retrieval keys of context {self.key.context_id!r} are missing")
        return part if read_retrieval_keys else None

    def read_nodes(self, manifest: pb.ContextManifest, indices: Sequence[int]) -> list[bytes]:
        names = [self.keys.node(self.version, i, manifest.nodes_per_chunk) for i in indices]
        with self.store._errors():
            pipe = self.store._redis.pipeline(transaction=False)
            for name in names:  # GETs, not MGET: a cluster pipeline refuses multi-key commands
                pipe.get(name)
            *payloads, current = pipe.hget(self.keys.head, "gen").execute()
        missing = [name for name, payload in zip(names, payloads, strict=True) if payload is None]
        if missing:
            if current != self.version.gen.encode():
                raise self.key.not_found("deleted, expired or replaced after it was opened")
            raise DataCorruption(
                f"{len(missing)} node payload(s) of context {self.key.context_id!r} are missing, e.g. {missing[0]}"
            )
        return payloads
