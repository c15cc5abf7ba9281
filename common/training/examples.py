"""Training and evaluation examples: (document tokens, decoder tokens, loss mask, query).

Two kinds, mixed by the trainer:
- language modelling: a span of text; its first part is compressed, the rest is the decoder
  segment and every next token of it is scored; retrieval is off (published choice);
- synthetic long-document questions: the document is compressed, the chat-formatted question
  plus the answer is the decoder input, only the answer is scored, the question is the query.

Either kind can be evidence-shaped (`Excerpts`, a share of the examples), as the product serves
a question: excerpts of the compressed document chosen for the question (for language
modelling, for the first QUERY_TOKENS of the segment) in the window before it, and everything
but the question (or the segment's opening) shielded from the injection as Engine.plan shields
it (evidence.shielded_spans), so the adapter learns to complement the excerpts rather than to
fight them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sharedllm.common.data.shards import SpanSampler
from sharedllm.common.data.synthetic import Filler, needle_task, passkey_task, records_task
from sharedllm.common.engine.evidence import (
    PassageIndex,
    choose,
    question_span,
    rank,
    render,
    render_excerpts,
    shielded_spans,
)
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.engine.results import Passage

QUERY_TOKENS = 64  # a language-modelling segment's opening (at most half), which its excerpts are chosen for


@dataclass(frozen=True)
class Example:
    document: list[int]
    decoder: list[int]
    scored_from: int  # decoder[t] is scored for t >= scored_from (predicted from decoder[:t])
    query: list[int] | None  # None: retrieval off
    shielded: tuple[tuple[int, int], ...] = ()  # decoder positions that read no injection (evidence.shielded_spans)


class Excerpts:
    """Makes a share of the examples evidence-shaped (see the module docstring).

    Passages are ranked lexically: the tree, whose retrieval keys serving also ranks by, does
    not exist until the trainer compresses the example.
    """

    def __init__(self, tokenizer, settings: EvidenceSettings, fraction: float, seed: int) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.fraction = fraction
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def wanted(self) -> bool:
        return self.rng.random() < self.fraction

    def passages(self, document: list[int], question: str) -> list[Passage]:
        index = PassageIndex(document, self.tokenizer, self.settings.passage_tokens)
        return choose(index, rank(index, question, None, self.settings), self.settings.tokens)


class LanguageModelling:
    def __init__(self, sampler: SpanSampler, context_tokens: int, excerpts: Excerpts | None = None) -> None:
        self.sampler = sampler
        self.context_tokens = context_tokens
        self.excerpts = excerpts

    def reseed(self, seed: int) -> None:
        self.sampler.reseed(seed)
        if self.excerpts is not None:
            self.excerpts.reseed(seed)

    def __call__(self) -> Example:
        example = lm_example(self.sampler.sample(1)[0].tolist(), self.context_tokens)
        if self.excerpts is None or not self.excerpts.wanted():
            return example
        x = self.excerpts
        opening = example.decoder[: min(QUERY_TOKENS, len(example.decoder) // 2)]  # leaves half to score
        passages = x.passages(example.document, x.tokenizer.decode(opening))
        block = x.tokenizer(render_excerpts(passages), add_special_tokens=False)["input_ids"] if passages else []
        decoder = block + example.decoder
        scored_from = len(block) + len(opening)
        # The opening stands for the question: it alone reads the injection, as a question does.
        return Example(
            example.document,
            decoder,
            scored_from,
            None,
            shielded_spans(x.settings, (len(block), scored_from), len(decoder)),
        )


class SyntheticQuestions:
    """Passkey, needle and key-value record tasks hidden in training text at random depths."""

    def __init__(
        self,
        tokenizer,
        filler_text: str,
        context_tokens: int,
        prompt_ids,
        eos_id: int,
        seed: int,
        excerpts: Excerpts | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.excerpts = excerpts
        self.filler = Filler(tokenizer, filler_text)
        self.context_tokens = context_tokens
        self.prompt_ids = prompt_ids
        self.eos_id = eos_id
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)
        if self.excerpts is not None:
            self.excerpts.reseed(seed)

    def __call__(self) -> Example:
        kind = self.rng.choice((passkey_task, needle_task, records_task))
        depth = self.rng.random()
        task = kind(self.filler, self.context_tokens, depth, self.rng.randrange(2**62))
        document = self.tokenizer(task.document, add_special_tokens=False)["input_ids"][: self.context_tokens]
        answer = self.tokenizer(task.answer, add_special_tokens=False)["input_ids"] + [self.eos_id]
        query = self.tokenizer(task.question, add_special_tokens=False)["input_ids"]
        if self.excerpts is None or not self.excerpts.wanted():
            prompt = self.prompt_ids(task.question)
            return Example(document, prompt + answer, len(prompt), query)
        passages = self.excerpts.passages(document, task.question)
        prompt = self.prompt_ids(render(passages, task.question))
        span = question_span(prompt, self.tokenizer, task.question)
        decoder = prompt + answer
        return Example(
            document, decoder, len(prompt), query, shielded_spans(self.excerpts.settings, span, len(decoder))
        )


def lm_example(span: list[int], context_tokens: int) -> Example:
    """The first context_tokens are compressed; every next token of the rest is scored; no query."""
    return Example(span[:context_tokens], span[context_tokens:], 1, None)


def fixed_lm_examples(sampler: SpanSampler, context_tokens: int, count: int) -> list[Example]:
    """A fixed held-out evaluation set (the sampler is seeded)."""
    return [lm_example(span.tolist(), context_tokens) for span in sampler.sample(count)]
