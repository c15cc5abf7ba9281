"""The one decode loop: every answer, baseline and benchmark method picks its tokens here.

A model variant supplies only `step`: feed token ids, get the logits after the last one.
SharedLLM's decoder steps with its injection and KV cache (or through the scheduler, batched
with other answers), full attention with a plain cache, StreamingLLM with its sink cache; they
all stop, sample and time by the same rule, so a comparison between them measures the models,
not three loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator

import torch

from sharedllm.common.engine.grounding import GroundedAnswer
from sharedllm.common.engine.loop_guard import LoopGuard
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import Finished, GenerateTimings, TokenDelta
from sharedllm.common.engine.sampling import Sampler
from sharedllm.common.engine.sentence_limit import SentenceLimit
from sharedllm.common.engine.streaming import TextStream

Step = Callable[[list[int]], torch.Tensor]  # token ids -> logits [vocab] after the last one


@torch.inference_mode()
def decode(
    step: Step,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: Collection[int],
    decode_text: Callable[[list[int]], str],
    device: torch.device,
    grounding: GroundedAnswer | None = None,
) -> Iterator[TokenDelta | Finished]:
    """Prefill the prompt, then yield text as it becomes final; a Finished comes last.

    Stops at an end-of-sequence token
    (not emitted), a stop string (the text ends before it), the sentence limit (the answer ends
    with its last sentence), a loop (params.loop_guard: the repeated run is not emitted) or
    max_new_tokens. grounding: the answer's facts are copied from the document (grounding.py);
    None: free generation.
    """
    started = time.perf_counter()
    seen = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    sampler = Sampler(params, device)
    stream = TextStream(decode_text, params.stop)
    guard = LoopGuard(params.loop_guard)
    sentences = SentenceLimit(params.max_sentences, decode_text)
    logits = step(prompt_ids)
    prefill_done = time.perf_counter()
    emitted = 0
    reason = "length"
    first_token_at = None
    for n in range(1, params.max_new_tokens + 1):
        token = sampler(logits, seen, grounding, final=n == params.max_new_tokens)
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if token in eos_ids:
            reason = "eos"
            break
        if sentences.complete_before(token):
            reason = "stop"
            break
        if grounding is not None:
            grounding.accept(token)
        for delta in _released(stream, guard.push(token)):
            emitted += 1
            yield delta
        if stream.stopped:
            reason = "stop"
            break
        if guard.looped:
            reason = "repetition"
            break
        if n == params.max_new_tokens:
            break
        seen = torch.cat([seen, torch.tensor([token], device=device)])
        logits = step([token])
    if not stream.stopped:
        for delta in _released(stream, guard.flush()):
            emitted += 1
            yield delta
        reason = "stop" if stream.stopped else reason
    yield from _end(stream)
    end = time.perf_counter()
    first = first_token_at or end
    yield Finished(
        reason=reason,
        text=stream.text,
        prompt_tokens=len(prompt_ids),
        completion_tokens=emitted,
        timings=GenerateTimings(
            prefill_s=prefill_done - started, time_to_first_token_s=first - started, decode_s=end - first
        ),
    )


def replay(
    token_ids: list[int], params: SamplingParams, decode_text: Callable[[list[int]], str]
) -> Iterator[TokenDelta | Finished]:
    """An answer whose tokens are already chosen (a quote of the document), streamed as `decode`
    streams what it generates: the same stop strings and token cap; the model reads nothing."""
    started = time.perf_counter()
    stream = TextStream(decode_text, params.stop)
    emitted = 0
    for delta in _released(stream, token_ids[: params.max_new_tokens]):
        emitted += 1
        yield delta
    reason = "stop" if stream.stopped else "length" if len(token_ids) > params.max_new_tokens else "eos"
    yield from _end(stream)
    yield Finished(
        reason=reason,
        text=stream.text,
        prompt_tokens=0,
        completion_tokens=emitted,
        timings=GenerateTimings(time_to_first_token_s=time.perf_counter() - started),
    )


def _released(stream: TextStream, tokens: list[int]) -> Iterator[TokenDelta]:
    """Each token's delta of text, until the stream meets a stop string."""
    for token in tokens:
        yield TokenDelta(token, stream.push(token))
        if stream.stopped:
            return


def _end(stream: TextStream) -> Iterator[TokenDelta]:
    tail = stream.flush()
    if tail:
        yield TokenDelta(None, tail)
