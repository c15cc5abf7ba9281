"""Training and evaluation examples: (document tokens, decoder tokens, loss mask, query).

Two kinds, mixed by the trainer:
- language modelling: a span of text; its first part is compressed, the rest is the decoder
  segment and every next token of it is scored; retrieval is off (published choice);
- synthetic long-document questions: the document is compressed, the chat-formatted question
  plus the answer is the decoder input, only the answer is scored, the question is the query.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sharedllm.common.data.shards import SpanSampler
from sharedllm.common.data.synthetic import Filler, needle_task, passkey_task, records_task


@dataclass(frozen=True)
class Example:
    document: list[int]
    decoder: list[int]
    scored_from: int  # decoder[t] is scored for t >= scored_from (predicted from decoder[:t])
    query: list[int] | None  # None: retrieval off


class LanguageModelling:
    def __init__(self, sampler: SpanSampler, context_tokens: int) -> None:
        self.sampler = sampler
        self.context_tokens = context_tokens

    def reseed(self, seed: int) -> None:
        self.sampler.reseed(seed)

    def __call__(self) -> Example:
        return lm_example(self.sampler.sample(1)[0].tolist(), self.context_tokens)


class SyntheticQuestions:
    """Passkey, needle and key-value record tasks hidden in training text at random depths."""

    def __init__(self, tokenizer, filler_text: str, context_tokens: int, prompt_ids, eos_id: int, seed: int) -> None:
        self.tokenizer = tokenizer
        self.filler = Filler(tokenizer, filler_text)
        self.context_tokens = context_tokens
        self.prompt_ids = prompt_ids
        self.eos_id = eos_id
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self) -> Example:
        kind = self.rng.choice((passkey_task, needle_task, records_task))
        depth = self.rng.random()
        task = kind(self.filler, self.context_tokens, depth, self.rng.randrange(2**62))
        document = self.tokenizer(task.document, add_special_tokens=False)["input_ids"][: self.context_tokens]
        prompt = self.prompt_ids(task.question)
        answer = self.tokenizer(task.answer, add_special_tokens=False)["input_ids"] + [self.eos_id]
        query = self.tokenizer(task.question, add_special_tokens=False)["input_ids"]
        return Example(document, prompt + answer, len(prompt), query)


def lm_example(span: list[int], context_tokens: int) -> Example:
    """The first context_tokens are compressed; every next token of the rest is scored; no query."""
    return Example(span[:context_tokens], span[context_tokens:], 1, None)


def fixed_lm_examples(sampler: SpanSampler, context_tokens: int, count: int) -> list[Example]:
    """A fixed held-out evaluation set (the sampler is seeded)."""
    return [lm_example(span.tolist(), context_tokens) for span in sampler.sample(count)]
