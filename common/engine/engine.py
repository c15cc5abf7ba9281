"""The engine facade: one object that compresses documents and answers questions.

Everything a front end needs (the command line, the gRPC services, batch jobs) goes through
here; it speaks in token ids, text and engine types, never in protobuf or gRPC.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sharedllm.common.config import DEFAULT_MAX_DOCUMENT_TOKENS, Limits, ModelChoice, TreeConfig
from sharedllm.common.engine.adapter import InjectionAdapter, read_adapter_config
from sharedllm.common.engine.append import AppendPlan, plan_append
from sharedllm.common.engine.citations import cite
from sharedllm.common.engine.compressor import Compressor, ProgressFn
from sharedllm.common.engine.decoder import Decoder, Injection
from sharedllm.common.engine.documents import DocumentMap, join_texts, names_of, token_starts_of
from sharedllm.common.engine.evidence import PassageIndex, choose, question_span, rank, render, shielded_spans
from sharedllm.common.engine.generation import replay
from sharedllm.common.engine.grounding import DocumentFacts, GroundedAnswer
from sharedllm.common.engine.llama import LlamaBody
from sharedllm.common.engine.params import EvidenceSettings, SamplingParams
from sharedllm.common.engine.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from sharedllm.common.engine.quotes import quote_spans, quote_text
from sharedllm.common.engine.results import Finished, GenerateTimings, Passage, TokenDelta
from sharedllm.common.engine.retrieval import node_similarity
from sharedllm.common.engine.scheduler import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, Scheduler
from sharedllm.common.engine.token_budget import TokenBudget
from sharedllm.common.engine.tree import ContextSource, ContextTree
from sharedllm.common.errors import InvalidInput
from sharedllm.common.model_loading import LoadedModel, dtype_from_name, load_model
from sharedllm.common.shipped import adapter_file, default_adapter_path

# Tokens kept free beside the evidence for the excerpts' markers and separators.
_EXCERPT_OVERHEAD_TOKENS = 8


@dataclass(frozen=True)
class Compressed:
    tree: ContextTree
    n_tokens: int
    seconds: float


@dataclass(frozen=True)
class QuestionPlan:
    """What the decode loop needs for one question: the window's tokens and the injection.

    prompt_ids: the chat-templated user message (evidence excerpts, then the question) and the
    answer prefix, if any; injection: the selected tree entries (None: no document, or the tree
    left out); evidence: the excerpts in the window, in document order; facts: the document's,
    which a grounded answer copies and cites (None: no document); quote: the character spans of
    the document a quoted answer copies (empty: the model writes); answer_prefix: its text.
    """

    prompt_ids: list[int]
    injection: Injection | None = None
    evidence: tuple[Passage, ...] = ()
    facts: DocumentFacts | None = None
    quote: tuple[tuple[int, int], ...] = ()
    answer_prefix: str = ""
    # Where each document starts (None: no document): returned passages and citations are
    # given in their own document's offsets, under its context id.
    documents: DocumentMap | None = None
    # evidence_s, selection_s, context_load_s and prepare_s; decoding adds the rest.
    timings: GenerateTimings = field(default_factory=GenerateTimings)


class Engine:
    """A base model, its injection adapter, and the operations on them."""

    def __init__(self, loaded: LoadedModel, adapter: InjectionAdapter, limits: Limits | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.body = LlamaBody(loaded.model)
        self.adapter = adapter
        # By default, as many tokens as chunk positions allow (never more than the product's 128K).
        position_bound = adapter.config.chunk_size * self.body.window
        self.limits = limits or Limits(max_document_tokens=min(DEFAULT_MAX_DOCUMENT_TOKENS, position_bound))
        self._check_positions(adapter.config)
        self.compressor = Compressor(self.body, adapter.config)
        self.decoder = Decoder(self.body, adapter, self._eos_ids())
        self.scheduler: Scheduler | None = None  # set by start_batching: answers share model steps
        self.lower_only = False

    def start_batching(
        self,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        threads: int | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        """From now on, answers running at once share batched model steps (scheduler.py); for a
        server or worker that answers several questions at a time, not for one-shot commands.
        threads: torch threads of the scheduler's thread; every other thread is then made
        single-threaded (scheduler.Scheduler, threads.py), as a batching decoder wants once it
        loaded its model single-threaded; None: nothing changes. prefix_cache_bytes: what it keeps
        of prompts read, for prompts that begin the same way (prefix_cache.py; 0: nothing)."""
        if self.scheduler is None:
            self.scheduler = Scheduler(
                self.decoder,
                max_batch=max_batch,
                prefill_chunk=prefill_chunk,
                threads=threads,
                prefix_cache_bytes=prefix_cache_bytes,
            )

    def _check_positions(self, config: TreeConfig) -> None:
        """Nothing may sit at a position the base model was not trained on (docs/method.md §1):
        token positions inside a chunk, and the chunk-level position of the queries."""
        if config.chunk_size > self.body.window:
            raise InvalidInput(f"chunk_size {config.chunk_size} exceeds the model's window of {self.body.window}")
        max_chunks = -(-self.limits.max_document_tokens // config.chunk_size)
        if config.positions == "chunk" and max_chunks > self.body.window:
            raise InvalidInput(
                f"max_document_tokens {self.limits.max_document_tokens} makes {max_chunks} chunks of "
                f"{config.chunk_size}; chunk positions must stay within the window of {self.body.window}"
            )

    @classmethod
    def load(
        cls,
        model: str | None = None,
        adapter: str | Path | None = None,
        device: str | None = None,
        limits: Limits | None = None,
        tree_config: TreeConfig | None = None,
        lower_only: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Engine:
        """Load the model and its adapter.

        adapter: a trained adapter file, or a shipped one's name. tree_config: a fresh, untrained adapter with this
        config (for training and tests). Neither: the shipped default adapter when the model
        is the default one and the file exists, else an untrained adapter with the default
        config. lower_only loads just the layers the compressor runs; such an engine can
        compress but not generate. dtype: None is the device's default (fp32 on CPUs).
        """
        if adapter is not None and tree_config is not None:
            raise ValueError("pass an adapter or a tree_config for a fresh adapter, not both")
        path = adapter_file(adapter) if adapter is not None else None
        if path is None and tree_config is None and model in (None, "", "default") and default_adapter_path().is_file():
            path = default_adapter_path()
        config = tree_config or (read_adapter_config(path) if path is not None else TreeConfig())
        loaded = load_model(model, device, dtype, lower_layers=config.n_layers if lower_only else None)
        body = LlamaBody(loaded.model)
        if path is not None:
            inj = InjectionAdapter.load(path, body, loaded.fingerprint)
        else:
            inj = InjectionAdapter.initialise(body, config)
            inj.base_fingerprint = loaded.fingerprint
        engine = cls(loaded, inj, limits)
        engine.lower_only = lower_only
        return engine

    @classmethod
    def from_choice(
        cls, choice: ModelChoice, *, lower_only: bool = False, tree_config: TreeConfig | None = None
    ) -> Engine:
        """The engine a front end's ModelChoice describes (see `load` for lower_only and tree_config).

        Here, not on ModelChoice: the configuration stays plain values that need no torch, and
        the engine, which imports the configuration, is the one layer that turns it into a model.
        """
        return cls.load(
            choice.model,
            choice.adapter,
            choice.device,
            choice.limits,
            tree_config,
            lower_only=lower_only,
            dtype=dtype_from_name(choice.dtype),
        )

    @property
    def trained(self) -> bool:
        return bool(self.adapter.provenance.get("trained"))

    @property
    def window(self) -> int:
        return self.body.window

    def _eos_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        configured = getattr(self.loaded.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(i) for i in configured)
        return ids

    # ---- documents -------------------------------------------------------------------

    def tokenize_document(self, text: str, counted: bool = False) -> list[int]:
        """The document's token ids, within the limit. counted=True: the caller has already fed
        the text to a token_budget(), which refuses an oversized one early."""
        if not text.strip():
            raise InvalidInput("document is empty")
        if "\x00" in text:
            raise InvalidInput("document contains NUL bytes; it looks binary, not text")
        if not counted:
            budget = self.token_budget()
            budget.add(text)  # refuses a text far over the limit before tokenising it whole
            budget.finish()
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.check_document_tokens(len(ids))
        return ids

    def token_budget(self) -> TokenBudget:
        """A counter that refuses a document once it passes the token limit (for text that
        arrives in pieces, or is too long to tokenise whole before knowing it fits)."""
        return TokenBudget(self.tokenizer, self.limits.max_document_tokens)

    def check_document_tokens(self, n: int) -> None:
        if n == 0:
            raise InvalidInput("document is empty")
        if n > self.limits.max_document_tokens:
            raise InvalidInput(f"document has {n} tokens; the limit is {self.limits.max_document_tokens}")

    def check_context_list(self, context_ids: Sequence[str]) -> None:
        """A list of contexts for one question: not empty, within the count, each once."""
        limit = self.limits.max_contexts_per_question
        if not context_ids:
            raise InvalidInput("no context id given")
        if len(context_ids) > limit:
            raise InvalidInput(f"{len(context_ids)} contexts given; one question reads at most {limit}")
        repeated = sorted({c for c in context_ids if context_ids.count(c) > 1})
        if repeated:
            raise InvalidInput(f"context {repeated[0]!r} is given more than once")

    def check_joined(self, context_ids: Sequence[str], n_tokens: Sequence[int], n_chunks: Sequence[int]) -> None:
        """Several contexts read by one question (documents.py) must fit where one document would:
        their tokens together within max_document_tokens, their chunks together within the chunk
        positions that allows (the range the adapter was trained and checked for)."""
        self.check_context_list(context_ids)
        tokens, chunks = sum(n_tokens), sum(n_chunks)
        if tokens > self.limits.max_document_tokens:
            raise InvalidInput(
                f"the {len(context_ids)} contexts hold {tokens} tokens together; one question reads at most "
                f"{self.limits.max_document_tokens}"
            )
        positions = -(-self.limits.max_document_tokens // self.adapter.config.chunk_size)
        if chunks > positions:
            raise InvalidInput(
                f"the {len(context_ids)} contexts hold {chunks} chunks together; chunk positions reach at most "
                f"{positions} (max_document_tokens / chunk_size)"
            )

    def check_token_ids(self, ids: list[int]) -> None:
        self.check_document_tokens(len(ids))
        vocab = self.body.embed.num_embeddings
        try:
            values = np.asarray(ids, dtype=np.int64)  # one vectorised pass, not a Python loop over 128K ids
        except (OverflowError, TypeError, ValueError) as exc:
            raise InvalidInput(f"token ids must be integers in [0, {vocab}): {exc}") from None
        outside = (values < 0) | (values >= vocab)
        if outside.any():
            raise InvalidInput(f"token id {int(values[outside.argmax()])} is outside the vocabulary [0, {vocab})")

    def check_addition(self, *, text: str | None = None, ids: list[int] | None = None) -> None:
        """What an append adds, checked before the stored context is read: not empty, text not
        binary, token ids in the vocabulary."""
        if not (text if text is not None else ids):
            raise InvalidInput("nothing to append: the text is empty")
        if text is not None and "\x00" in text:
            raise InvalidInput("appended text contains NUL bytes; it looks binary, not text")
        if ids:
            self.check_token_ids(ids)

    def plan_append(
        self,
        stored_ids: list[int],
        chunk_lengths: Sequence[int],
        *,
        text: str | None = None,
        ids: list[int] | None = None,
    ) -> AppendPlan:
        """What appending `text` (or token ids, checked first with check_addition) to a stored
        document encodes (append.py), within the document limit."""
        plan = plan_append(
            stored_ids, chunk_lengths, self.adapter.config.chunk_size, self.tokenizer, text=text, ids=ids
        )
        self.check_document_tokens(plan.kept_tokens + len(plan.tail_ids))
        return plan

    def compress(self, token_ids: list[int], progress: ProgressFn | None = None) -> Compressed:
        start = time.perf_counter()
        tree = self.compressor.compress(token_ids, progress)
        return Compressed(tree, len(token_ids), time.perf_counter() - start)

    # ---- questions -------------------------------------------------------------------

    def prompt_ids(self, question: str) -> list[int]:
        """The question in the model's chat template, ready for the assistant's answer."""
        if not question.strip():
            raise InvalidInput("prompt is empty")
        if len(question) > self.limits.max_prompt_chars:
            raise InvalidInput(f"prompt has {len(question)} characters; the limit is {self.limits.max_prompt_chars}")
        return self._chat_ids(question)

    def _chat_ids(self, question: str) -> list[int]:
        messages = [{"role": "user", "content": question}]
        if self.tokenizer.chat_template:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        return self.tokenizer(question)["input_ids"]

    def check_request(self, question: str, params: SamplingParams) -> list[int]:
        """Validate a question and its parameters; returns the prompt's token ids.

        Callers run it before any store read, so a bad request costs nothing and touches nothing.
        """
        if self.lower_only:
            raise RuntimeError("this engine holds only the lower layers (a compressor); it cannot generate")
        prompt = self.prompt_ids(question)
        params.validate(self.window)
        if len(prompt) + params.max_new_tokens > self.window:
            raise InvalidInput(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's window of {self.window} tokens"
            )
        return prompt

    def passage_index(self, source: ContextSource, passage_tokens: int) -> PassageIndex:
        """The passages of a context's documents and their lexical index (cache it per context)."""
        return PassageIndex(source.token_ids.tolist(), self.tokenizer, passage_tokens, token_starts_of(source))

    @torch.inference_mode()
    def plan(
        self,
        source: ContextSource | None,
        question: str,
        *,
        max_new_tokens: int,
        evidence: EvidenceSettings,
        retrieval: bool = True,
        inject: bool = True,
        answer_prefix: str = "",
        index: PassageIndex | None = None,
        quote: bool = False,
    ) -> QuestionPlan:
        """Build the window and the injection for one question: the one path every front end,
        evaluation and baseline takes (docs/method.md §3, §5a, §5b).

        evidence.tokens > 0 fills that budget of the window (clipped to what fits beside the
        question and max_new_tokens) with passages ranked for the question; their ranking also
        steers which tree nodes expand. retrieval=False always expands the most recent child
        and ranks passages lexically only. inject=False leaves the tree out (evidence alone).
        answer_prefix opens the assistant's turn (evaluations' "The answer is"). quote=True: the
        answer will quote the document where its excerpts allow (quotes.py); then the plan holds
        the quoted spans and no injection (a quote reads no tree node).
        """
        evidence_s = 0.0
        query = None
        if source is not None and retrieval and (inject or evidence.tokens > 0):
            query = self.decoder.query_vector(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        prefix = self.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
        passages: list[Passage] = []
        bias = None
        if source is not None and evidence.tokens > 0:
            started = time.perf_counter()
            index = self.usable_index(source, evidence.passage_tokens, index)
            room = self.window - max_new_tokens - len(self._chat_ids(render([], question))) - len(prefix)
            budget = min(evidence.tokens, room - _EXCERPT_OVERHEAD_TOKENS)
            passages, bias = self.choose_evidence(source, question, query, evidence, budget, index)
            evidence_s = time.perf_counter() - started
        facts = documents = None
        if source is not None:
            if index is not None:
                facts, documents = index.facts, index.document_map(names_of(source))
            else:
                facts, documents = self.document_facts(source)
        prompt = self._chat_ids(render(passages, question, documents)) + prefix
        while passages and len(prompt) + max_new_tokens > self.window:  # excerpt markers took more than planned
            passages.remove(min(passages, key=lambda p: p.score))
            prompt = self._chat_ids(render(passages, question, documents)) + prefix
        quoted: list[tuple[int, int]] = []
        if quote and facts is not None:
            # About 3 characters a token (English prose runs at 3.7-4): the quote fits the token cap.
            quoted = quote_spans(question, facts.text, passages, max_chars=3 * max_new_tokens)
        injection = None
        timings = GenerateTimings(evidence_s=evidence_s)
        if source is not None and inject and not quoted:
            t0 = time.perf_counter()
            injection, prep = self.decoder.prepare(source, query, bias)
            if passages:
                span = question_span(prompt, self.tokenizer, question)
                injection = dataclasses.replace(injection, shielded=shielded_spans(evidence, span, sys.maxsize))
            timings = timings.plus(prep).plus(GenerateTimings(prepare_s=time.perf_counter() - t0))
        return QuestionPlan(
            prompt,
            injection,
            tuple(passages),
            facts=facts,
            quote=tuple(quoted),
            answer_prefix=answer_prefix,
            documents=documents,
            timings=timings,
        )

    def document_facts(self, source: ContextSource) -> tuple[DocumentFacts, DocumentMap]:
        """The facts of the documents with no passage index at hand (tree alone): their decoded
        texts, joined as a passage index joins them, and where each starts."""
        ids, starts = source.token_ids.tolist(), token_starts_of(source)
        texts = self.tokenizer.batch_decode(
            [ids[a:b] for a, b in itertools.pairwise([*starts, len(ids)])],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        text, char_starts = join_texts(texts)
        return DocumentFacts(text), DocumentMap(names_of(source), starts, char_starts)

    def usable_index(self, source: ContextSource, passage_tokens: int, index: PassageIndex | None) -> PassageIndex:
        """`index` if it was built for these documents and passage size, else a new one."""
        built_for = (passage_tokens, sum(source.chunk_lengths), token_starts_of(source))
        usable = index is not None and (index.passage_tokens, index.n_tokens, index.document_starts) == built_for
        return index if usable else self.passage_index(source, passage_tokens)

    def choose_evidence(
        self,
        source: ContextSource,
        question: str,
        query: torch.Tensor | None,
        evidence: EvidenceSettings,
        budget: int,
        index: PassageIndex | None = None,
    ) -> tuple[list[Passage], torch.Tensor | None]:
        """The passages for `question` within `budget` tokens, in document order, and the bias
        their ranking puts on the tree's node selection (None without a query vector)."""
        index = self.usable_index(source, evidence.passage_tokens, index)
        sims = None if query is None else node_similarity(source.retrieval_keys, query).cpu().numpy()
        depth = source.config.depth
        tree = None if sims is None else index.tree_scores(sims, source.chunk_lengths, depth)
        # Rank for the budget that fits: a spread over the document must span all of it.
        ranking = rank(index, question, tree, dataclasses.replace(evidence, tokens=max(budget, 0)))
        passages = choose(index, ranking, budget)
        bias = None
        if sims is not None:
            bias = torch.from_numpy(index.node_scores(ranking.scores, source.chunk_lengths, depth))
        return passages, bias

    def generate(
        self,
        source: ContextSource | None,
        question: str,
        params: SamplingParams,
        retrieval: bool = True,
        evidence: EvidenceSettings | None = None,
        index: PassageIndex | None = None,
        scope: Hashable = "",
    ) -> Iterator[TokenDelta | Finished]:
        """Answer `question` about the compressed context `source` (None: no document).

        evidence: how much of the window holds excerpts chosen for the question (None: the
        default settings); index: the document's passage index, if the caller keeps one; scope:
        whose earlier prompts this one may reuse read blocks of (the tenant; scheduler.py).
        """
        self.check_request(question, params)
        evidence = evidence or EvidenceSettings()
        plan = self.plan(
            source,
            question,
            max_new_tokens=params.max_new_tokens,
            evidence=evidence,
            retrieval=retrieval,
            index=index,
            quote=params.grounding == "quote",
        )
        return self.decode(plan, params, scope)

    def decode(
        self, plan: QuestionPlan, params: SamplingParams, scope: Hashable = ""
    ) -> Iterator[TokenDelta | Finished]:
        """Answer from a plan, as params.grounding asks: a quote of the plan's document (replayed),
        or decoded (generation.decode) with its facts copied from the document, or free. The
        Finished carries the plan's timings and evidence and the answer's citations."""
        if params.grounding == "quote" and plan.quote and plan.facts is not None:
            events = replay(self._quote_ids(plan, params.max_new_tokens), params, self.decode_text)
        else:
            grounding = None
            if params.grounding != "off" and plan.facts is not None:
                grounding = GroundedAnswer(plan.facts, self.decode_text, self.decoder.eos_ids, plan.answer_prefix)
            if self.scheduler is not None:
                events = self.scheduler.generate(
                    plan.prompt_ids, plan.injection, params, self.decode_text, grounding, scope=scope
                )
            else:
                events = self.decoder.generate(plan.prompt_ids, plan.injection, params, self.decode_text, grounding)
        for event in events:
            if isinstance(event, Finished):
                evidence = plan.evidence
                citations = cite(event.text, plan.facts, evidence) if plan.facts is not None else ()
                if plan.documents is not None:  # each in its own document's offsets, naming its context
                    evidence = tuple(map(plan.documents.localize_passage, evidence))
                    citations = tuple(
                        plan.documents.localize_citation(c) for c in citations if plan.documents.within_one(c)
                    )
                yield dataclasses.replace(
                    event, timings=plan.timings.plus(event.timings), evidence=evidence, citations=citations
                )
            else:
                yield event

    def _quote_ids(self, plan: QuestionPlan, max_new_tokens: int) -> list[int]:
        """The quote's tokens: its sentences, best first, while whole ones fit the token cap (the
        best one, cut, if even it does not)."""
        assert plan.facts is not None
        ids: list[int] = []
        for n in range(1, len(plan.quote) + 1):
            longer = self.tokenizer(quote_text(plan.facts.text, plan.quote[:n]), add_special_tokens=False)["input_ids"]
            if len(longer) > max_new_tokens and ids:
                break
            ids = longer
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logits(
        self,
        prompt_ids: list[int],
        source: ContextSource | None = None,
        query_ids: list[int] | None = None,
        from_position: int = 0,
        shielded: tuple[tuple[int, int], ...] = (),
    ) -> torch.Tensor:
        """Logits [L - from_position, V] of a whole sequence (perplexity, training, tests): the tree's
        nodes chosen by the query (None: the most recent child), no ranking bias; `shielded`
        position ranges read no injection (excerpts in the window, as Engine.plan shields them).
        Gradients flow unless the caller turns them off."""
        injection = None
        if source is not None:
            query = self.decoder.query_vector(query_ids) if query_ids else None
            injection, _ = self.decoder.prepare(source, query)
            injection = dataclasses.replace(injection, shielded=shielded)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.body.device)
        return self.body.logits(self.decoder.forward(ids, 0, None, injection)[0, from_position:])
