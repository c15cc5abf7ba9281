"""Continuous batching: one thread owns the model's steps, and every answer in flight shares them.

Each answer still runs its own decode loop (generation.decode: sampling, grounding, stop
strings, the loop guard) in its caller's thread; only its model steps come here. The scheduler
thread takes, per iteration, the next token of every answer waiting for one and pieces of the
prompts waiting to be read, oldest first, `prefill_chunk` tokens of them in all (at most
`max_batch` rows), and runs them as one step (Decoder.step_rows: the rows' tokens packed into one
sequence, so the weights are read once for all of them). A prompt is read a piece per step
(chunked prefill, cut where an attention block ends), so it stalls the answers already decoding
for one piece at a time; with nothing decoding, the oldest prompt is read at once. An answer
joins when its first step arrives and leaves when its loop ends or its caller stops listening;
its KV cache is its own and goes with it.

Rows are independent: a row's attention and injection read only its own cache and tree, and the
batched projections compute each row's output from that row alone. On the CPU the projections
are oneDNN's packed products (kernels/packed_linear.py), which give a row the same bits whatever
else the step holds, and a prompt attends in fixed blocks of positions (Decoder.step_rows), at
whose ends alone the scheduler cuts it; so an answer is the same to the bit alone, batched, and
from the one-answer decoder (the suite checks the logits bit for bit and answers token for
token). On a GPU, kernels may change with the number of rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch

from sharedllm.common.engine import threads as torch_threads
from sharedllm.common.engine.decoder import Decoder, Injection, uninjected_prefix
from sharedllm.common.engine.generation import decode
from sharedllm.common.engine.grounding import GroundedAnswer
from sharedllm.common.engine.llama import KVCache
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, CachedBlock, PrefixCache
from sharedllm.common.engine.results import Finished, TokenDelta
from sharedllm.common.telemetry import metrics

_log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
# Prompt tokens per step while answers decode (at least one attention block: a smaller budget
# reads one block). Measured with 8 clients asking at once (256-token answers, 600-token
# prompts, 2 cores; bench/prefill_chunk.py): 512 against 64 gave 58.2 against 50.3 tokens/s,
# first token p95 8.3 against 13.9 s (before attention blocks and packed linears); with both,
# 512, 1024 and 2048 gave 81.0, 71.5 and 75.3 tokens/s at 8 clients and 86.7, 94.3 and 94.8 at
# 16, within the noise of such runs on a shared machine.
DEFAULT_PREFILL_CHUNK = 512
MAX_PIECE = 4096  # the most prompt tokens one step reads when nothing else is decoding
# How long an iteration waits for answers that are between two steps (sampling their last token)
# before it runs without them: long enough for a sampler, short against a step.
GATHER_S = 0.002


def _piece(row: _Row, budget: int, block: int) -> int:
    """How many of `row`'s prompt tokens a step with `budget` tokens left reads: up to the last end
    of an attention block within the budget, or the whole rest; 0 when neither fits. Decoder.step_rows
    attends in those blocks, so where a prompt is cut never changes its arithmetic."""
    rest = len(row.pending)
    if rest <= budget:
        return rest
    start = row.cache.length
    return max(0, (start + budget) // block * block - start)


def _past_prompt(row: _Row) -> bool:
    """The row's prompt is read: it waits for the next token of its answer, or is sampling one."""
    return row.cache.length > 0 and len(row.pending) <= 1


@dataclass(frozen=True)
class SchedulerStats:
    """What the scheduler is doing, for GetServerInfo and the metrics."""

    rows: int  # answers in flight (decoding, reading their prompt, or between steps)
    last_batch: int  # rows in the last batched step (answers decoding, and prompts being read)
    steps: int  # batched steps run
    step_seconds: float  # the last batched step's duration
    prefill_chunks: int  # batched steps that read prompt tokens
    prefix_cache_bytes: int  # prompt blocks kept for prompts that begin the same way (prefix_cache.py)
    prefix_blocks_reused: int  # blocks a prompt started from instead of reading them


@dataclass(eq=False)
class _Row:
    """One answer's state on the scheduler's side."""

    cache: KVCache
    injection: Injection | None
    pending: list[int] = field(default_factory=list)  # tokens to feed before the next result
    arrived: float = 0.0  # when `pending` was set: the oldest is served first
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    scope: Hashable = ""  # whose prompts may share blocks with this one's (prefix_cache.py)
    prompt: list[int] = field(default_factory=list)
    reusable: int = 0  # leading prompt tokens whose blocks may be shared
    shared: int = 0  # leading prompt tokens taken from, or given to, the prefix cache


class Scheduler:
    """Runs the decoder's steps for every answer in flight, in one thread (see the module doc)."""

    def __init__(
        self,
        decoder: Decoder,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        threads: int | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        """prefix_cache_bytes: the budget of prompt blocks kept for later prompts (0: none).
        threads: torch threads of the scheduler's thread. Given, this constructor also makes
        the calling thread and every thread that starts torch work afterwards single-threaded
        (threads.py), for good (close() does not undo it): for a process that made torch
        single-threaded before loading the model, so that the scheduler's thread keeps its only
        OpenMP pool. None: the scheduler's thread runs with the process's setting, nothing else
        changes."""
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        self.decoder = decoder
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Condition()
        self._rows: list[_Row] = []
        self._stopped = False
        self._last_batch = 0
        self._steps = 0
        self._step_s = 0.0
        self._prefill_chunks = 0
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        ready = threading.Event()
        started: list[BaseException] = []  # what stopped the thread before its loop, if anything
        self._thread = threading.Thread(target=self._run, args=(threads, ready, started), name="scheduler", daemon=True)
        self._thread.start()
        ready.wait()
        if started:
            raise started[0]
        if threads is not None:  # `use` set the process-wide count too: put it back to one
            torch_threads.keep_single_threaded()

    def generate(
        self,
        prompt_ids: list[int],
        injection: Injection | None,
        params: SamplingParams,
        decode_text: Callable[[list[int]], str],
        grounding: GroundedAnswer | None = None,
        scope: Hashable = "",
    ) -> Iterator[TokenDelta | Finished]:
        """Decoder.generate's answer, its model steps batched with the other answers in flight.
        scope: prompts of the same scope (a tenant) may share read blocks (prefix_cache.py)."""
        row = _Row(self.decoder.body.new_cache(len(prompt_ids) + params.max_new_tokens), injection, scope=scope)
        with self._lock:
            self._rows.append(row)
        try:
            device = self.decoder.body.device
            yield from decode(lambda ids: self._step(row, ids), prompt_ids, params, self.decoder.eos_ids,
                              decode_text, device, grounding)  # fmt: skip
        finally:
            with self._lock:
                self._rows.remove(row)
                self._lock.notify_all()  # a batch being gathered need not wait for it

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(
                len(self._rows),
                self._last_batch,
                self._steps,
                self._step_s,
                self._prefill_chunks,
                self.prefix_cache.bytes,
                self.prefix_cache.reused_blocks,
            )

    def close(self) -> None:
        """Stop the thread; answers still waiting for a step get an error."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def _step(self, row: _Row, ids: list[int]) -> torch.Tensor:
        """Hand `ids` to the scheduler and wait for the logits after the last of them."""
        if not ids:
            raise ValueError("a model step needs at least one token")
        reused = self._reuse(row, list(ids)) if row.cache.length == 0 and not row.prompt else 0
        with self._lock:
            if self._stopped:
                raise RuntimeError("the scheduler has stopped")
            row.cache.advance(reused)  # with `pending`, so the row never looks past its prompt before it is
            ids = ids[reused:]
            row.pending, row.arrived, row.result, row.error = list(ids), time.perf_counter(), None, None
            row.done.clear()
            self._lock.notify_all()
        row.done.wait()
        if row.error is not None:
            raise row.error
        assert row.result is not None
        return row.result

    def _reuse(self, row: _Row, prompt: list[int]) -> int:
        """Copy into the row's cache the cached blocks its prompt begins with; how many tokens they hold."""
        row.prompt = prompt
        row.reusable = min(len(prompt) - 1, uninjected_prefix(row.injection, len(prompt)))
        if not self.prefix_cache.max_bytes:
            return 0
        block = self.decoder.block
        with self._lock:
            found = self.prefix_cache.lookup(row.scope, prompt, row.reusable, block)
        for n, cached in enumerate(found):
            cached.write(row.cache, n * block)
        metrics.PREFIX_BLOCKS_REUSED.inc(len(found))
        row.shared = len(found) * block
        return row.shared

    def _share(self, row: _Row) -> None:
        """Keep the whole blocks the row's prompt has read since it last gave some (scheduler's thread)."""
        block = self.decoder.block
        while row.shared + block <= min(row.cache.length, row.reusable):
            start, end = row.shared, row.shared + block
            with self._lock:
                kept = self.prefix_cache.touch(row.scope, row.prompt[:end])
            if not kept:
                cached = CachedBlock.read(row.cache, start, end)
                with self._lock:
                    self.prefix_cache.add(row.scope, row.prompt[:end], cached)
                    metrics.PREFIX_CACHE_BYTES.set(self.prefix_cache.bytes)
            row.shared = end

    @torch.inference_mode()
    def _run(self, threads: int | None, ready: threading.Event, started: list[BaseException]) -> None:
        try:
            if threads is not None:
                torch_threads.use(threads)
        except BaseException as exc:  # e.g. threads < 1: raised by the constructor, which waits for `ready`
            started.append(exc)
            return
        finally:
            ready.set()
        while True:
            with self._lock:
                while not self._stopped and not any(r.pending for r in self._rows):
                    self._lock.wait()
                if self._stopped:
                    self._fail_all(RuntimeError("the scheduler has stopped"))
                    return
                self._gather()
                decoding, reading = self._choose()
            try:
                self._step_batch(decoding, reading)
            except BaseException as exc:  # a bug outside the model step: fail these answers, not the thread
                with self._lock:
                    for row in (*decoding, *(row for row, _ in reading)):
                        row.error = exc
                        row.pending = []
                        row.done.set()

    def _choose(self) -> tuple[list[_Row], list[tuple[_Row, int]]]:
        """The next step's rows (the lock held): every answer waiting for its next token, oldest
        first, and pieces of the prompts waiting to be read, oldest first, of `prefill_chunk`
        tokens in all (the oldest always reads at least an attention block); the oldest prompt
        whole (up to MAX_PIECE) while no answer is past its prompt, for no one waits for it then."""
        waiting = sorted((r for r in self._rows if r.pending), key=lambda r: r.arrived)
        prompts = [r for r in waiting if not _past_prompt(r)]
        block = self.decoder.block
        if not any(map(_past_prompt, self._rows)):
            return [], [(prompts[0], _piece(prompts[0], MAX_PIECE, block))] if prompts else []
        decoding = [r for r in waiting if _past_prompt(r)]
        reading: list[tuple[_Row, int]] = []
        budget = max(self.prefill_chunk, block)
        # Answers decoding keep their rows; prompts take what is left, always at least one.
        for row in prompts[: max(1, self.max_batch - len(decoding))]:
            n = _piece(row, budget, block)
            if n:  # else the budget left holds no block end of this prompt; a later one may fit
                reading.append((row, n))
            budget -= n
        return decoding[: self.max_batch - len(reading)], reading

    def _fail_all(self, error: BaseException) -> None:
        for row in self._rows:
            row.error, row.pending = error, []
            row.done.set()

    def _gather(self) -> None:
        """Wait (briefly, the lock released) for rows between two steps, so they join this batch."""
        deadline = time.perf_counter() + GATHER_S
        while (
            not self._stopped
            and any(not r.pending for r in self._rows)
            and (left := deadline - time.perf_counter()) > 0
        ):
            self._lock.wait(left)

    def _step_batch(self, decoding: list[_Row], reading: list[tuple[_Row, int]]) -> None:
        """One model step: the next token of every decoding row, and the chosen piece of each
        prompt being read."""
        rows = decoding + [row for row, _ in reading]
        if not rows:
            return
        pieces = [r.pending[:1] for r in decoding] + [row.pending[:n] for row, n in reading]
        started = time.perf_counter()
        try:
            logits = self.decoder.step_rows(pieces, [r.cache for r in rows], [r.injection for r in rows])
        except BaseException as exc:  # each row's caller raises it
            for row in rows:
                self._finish(row, None, exc)
            return
        seconds = time.perf_counter() - started
        metrics.BATCH_ROWS.set(len(rows))
        metrics.STEP_SECONDS.observe(seconds)
        with self._lock:
            self._last_batch, self._steps, self._step_s = len(rows), self._steps + 1, seconds
            self._prefill_chunks += bool(reading)
        if self.prefix_cache.max_bytes:
            for row in rows:
                try:
                    self._share(row)
                except Exception:  # keeping blocks is an optimisation: it never fails an answer
                    _log.warning("could not keep a prompt's blocks; the prompt goes on without", exc_info=True)
                    row.reusable = row.shared
        for index, (row, piece) in enumerate(zip(rows, pieces, strict=True)):
            rest = row.pending[len(piece) :]
            if rest:  # the prompt goes on: its logits so far mean nothing yet
                with self._lock:
                    row.pending = rest
            else:
                self._finish(row, logits[index], None)

    def _finish(self, row: _Row, result: torch.Tensor | None, error: BaseException | None) -> None:
        with self._lock:
            row.pending, row.result, row.error = [], result, error
        row.done.set()
