"""Evidence: raw passages of the document, chosen for one question, placed in the decoder's window.

Why (docs/method.md §5a): a small decoder cannot copy exact facts (numbers, names) out of an
injected tree, but it reads them from its own window. So the window is filled, up to a token
budget, with the passages the question needs, in document order; the tree still brings the
whole document through the cross-attention.

How passages are chosen:
- The document's stored token ids are cut into passages of about `passage_tokens` tokens,
  ending at a sentence or line end where one falls in the second half of the span.
- Each passage gets a lexical score (BM25 from `bm25s`, English stop words, Snowball stems)
  and a tree score (the cosine of the question's layer-0 vector with the retrieval keys of
  the tree leaves it overlaps: the same signal that drives node selection). The ranking is
  the lexical score scaled to [0, 1] plus a small weight times the tree score scaled to
  [0, 1]; with no lexical match at all it is the tree score alone.
- Multi-hop: the best passage's rare identifiers and values (words with a digit, an
  underscore or in capitals, found in at most `hop_max_df` passages) become the next query,
  so a chain such as "X = 5 ... Y = X" is followed where the question names only its first
  link. Each hop adds the best new passage. Prose words are never followed: measured on
  the demo, chasing rare prose words fills the window with unrelated passages.
- The budget is spent in priority order: the best passage and its hops, then lexical hits in
  rank order, each followed by its right and left neighbours, then the rest of the ranking. A question without
  any lexical match (or a request to summarise) spends half (or all) of it on passages spread
  evenly across the document, so the decoder sees its shape.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import bm25s
import numpy as np
import Stemmer

from sharedllm.common.engine.compressor import node_spans
from sharedllm.common.engine.documents import DOCUMENT_SEPARATOR, DocumentMap, join_texts
from sharedllm.common.engine.grounding import DocumentFacts
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.engine.results import Passage
from sharedllm.common.errors import InvalidInput

_log = logging.getLogger(__name__)

EXCERPTS_HEADER = "Excerpts from the document, in order:"
EXCERPTS_HEADER_SEVERAL = "Excerpts from the documents, in order:"
# Where a passage may end. Never after a colon within a line: it introduces what follows ("... is: 6177498."),
# and a cut there left a key in one passage and its value in the next, where a question's words
# never find it (the plain BM25 baseline lost single needles to exactly that cut).
_SENTENCE_END = re.compile(r"[.!?;\"')\]]\s*$|\n")
_STOPWORDS = bm25s.stopwords.STOPWORDS_EN_PLUS  # the library's longer list: it has question words
# Identifiers and values: a word with a digit or an underscore, or two or more capitals.
_IDENTIFIER = re.compile(r"\b(?:\w*[\d_]\w*|[A-Z][A-Z0-9]+)\b")


_local = threading.local()


def _stemmer() -> Stemmer.Stemmer:
    """One stemmer per thread: PyStemmer's stemmers must not be shared between threads."""
    if not hasattr(_local, "stemmer"):
        _local.stemmer = Stemmer.Stemmer("english")
    return _local.stemmer


def _tokenize(texts: Sequence[str], return_ids: bool) -> Any:
    return bm25s.tokenize(
        list(texts), stopwords=_STOPWORDS, stemmer=_stemmer(), return_ids=return_ids, show_progress=False
    )


def terms(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased, stemmed content words of each text, as the lexical index sees them."""
    return _tokenize(texts, return_ids=False)


def split_passages(token_ids: Sequence[int], tokenizer: Any, size: int) -> list[tuple[int, int]]:
    """Token spans [start, end) of about `size` tokens covering the document.

    A span ends after the last token in its second half that closes a sentence or a line, so a
    fact stated in one sentence is rarely cut in two; otherwise it is cut at `size`.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(token_ids))
    ends = np.fromiter((bool(_SENTENCE_END.search(_readable(p))) for p in pieces), dtype=bool, count=len(pieces))
    spans: list[tuple[int, int]] = []
    start, n = 0, len(pieces)
    while start < n:
        end = min(start + size, n)
        if end < n:
            half = start + size // 2
            hits = np.flatnonzero(ends[half:end])
            if hits.size:
                end = half + int(hits[-1]) + 1
        spans.append((start, end))
        start = end
    return spans


def _whole_characters(spans: list[tuple[int, int]], ids: list[int], tokenizer: Any) -> list[tuple[int, int]]:
    """Move each cut that falls inside a multi-byte character (the passage before it decodes to
    U+FFFD at its end) forward by a token or three, so every passage decodes to whole characters
    and the passages' texts add up to the document's."""
    spans = list(spans)
    for i in range(len(spans) - 1):
        for _ in range(3):
            (start, end), (_, next_end) = spans[i], spans[i + 1]
            if next_end - end <= 1 or not tokenizer.decode(ids[max(start, end - 4) : end]).endswith("\ufffd"):
                break
            spans[i], spans[i + 1] = (start, end + 1), (end + 1, next_end)
    return spans


def _readable(piece: str | None) -> str:
    """A byte-level BPE piece with its space and newline markers as the characters they stand for."""
    return (piece or "").replace("\u0120", " ").replace("\u010a", "\n")


class PassageIndex:
    """The passages of one document (or of several joined: documents.py) and their lexical index;
    built once, asked many questions.

    document_starts: where each document starts in `token_ids` ((0,): one document). No passage
    crosses a document's start, and in the character offsets each document after the first
    starts DOCUMENT_SEPARATOR later (the joined text that quotes and citations read).
    """

    def __init__(
        self, token_ids: Sequence[int], tokenizer: Any, passage_tokens: int, document_starts: Sequence[int] = (0,)
    ) -> None:
        if len(token_ids) == 0:
            raise InvalidInput("the context holds no document tokens")
        self.passage_tokens = passage_tokens
        ids = list(token_ids)
        self.document_starts = tuple(document_starts)
        self.spans, first_passages = [], []
        for start, end in itertools.pairwise([*self.document_starts, len(ids)]):
            first_passages.append(len(self.spans))
            own = ids[start:end]
            spans = _whole_characters(split_passages(own, tokenizer, passage_tokens), own, tokenizer)
            self.spans += [(s + start, e + start) for s, e in spans]
        self.texts: list[str] = tokenizer.batch_decode(
            [ids[s:e] for s, e in self.spans], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        lengths = np.fromiter((len(t) for t in self.texts), dtype=np.int64, count=len(self.texts))
        before = np.zeros(len(self.texts), dtype=np.int64)  # the separator before each document but the first
        before[first_passages[1:]] = len(DOCUMENT_SEPARATOR)
        self.char_starts = np.cumsum(before) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._first_passages = first_passages
        self.token_starts = np.asarray([s for s, _ in self.spans], dtype=np.int64)
        self.n_tokens = len(ids)
        tokenized = _tokenize(self.texts, return_ids=True)
        self._bm25 = bm25s.BM25()
        self._bm25.index(tokenized, show_progress=False)
        words = {i: w for w, i in tokenized.vocab.items()}
        df: dict[str, int] = {}
        for row in tokenized.ids:
            for term in {words[i] for i in row}:
                df[term] = df.get(term, 0) + 1
        self._df = df
        identifiers = terms([" ".join(_IDENTIFIER.findall(t)) for t in self.texts])
        self._identifiers = [set(found) & df.keys() for found in identifiers]

    def __len__(self) -> int:
        return len(self.spans)

    @cached_property
    def facts(self) -> DocumentFacts:
        """The document's words and text for grounded answers (built on first use, kept with the index)."""
        return DocumentFacts(join_texts(self.document_texts)[0])

    def document_map(self, names: Sequence[str | None]) -> DocumentMap:
        """Where each document starts, in tokens and in the joined text, under the given names."""
        starts = tuple(int(self.char_starts[i]) for i in self._first_passages)
        return DocumentMap(tuple(names), self.document_starts, starts)

    @property
    def document_texts(self) -> list[str]:
        """Each document's text (its passages' texts add up to it)."""
        bounds = [*self._first_passages, len(self.texts)]
        return ["".join(self.texts[a:b]) for a, b in itertools.pairwise(bounds)]

    def lexical(self, query_terms: Sequence[str]) -> np.ndarray:
        """BM25 score of every passage for the stemmed terms (unknown terms score nothing)."""
        known = [t for t in query_terms if t in self._df]
        if not known:
            return np.zeros(len(self), dtype=np.float64)
        return np.asarray(self._bm25.get_scores(known), dtype=np.float64)

    def rare_identifiers(self, passage: int, exclude: set[str], max_df: int) -> list[str]:
        """Identifiers and values of a passage found in at most `max_df` passages: a hop's query."""
        return sorted(t for t in self._identifiers[passage] if t not in exclude and self._df[t] <= max_df)

    def passage(self, i: int, score: float) -> Passage:
        s, e = self.spans[i]
        start = int(self.char_starts[i])
        return Passage(s, e, start, start + len(self.texts[i]), self.texts[i], float(score))

    def tree_scores(self, node_sims: np.ndarray, chunk_lengths: Sequence[int], depth: int) -> np.ndarray:
        """Per passage, the best similarity of a tree leaf it overlaps (node_sims: [B, N] of every node)."""
        per_token = np.empty(self.n_tokens, dtype=np.float64)
        leaves = slice(2**depth - 2, None)
        for b, spans in enumerate(_chunk_node_spans(chunk_lengths, depth)):
            for sim, (s, e) in zip(node_sims[b, leaves], spans[leaves], strict=True):
                per_token[s:e] = sim
        return np.maximum.reduceat(per_token, self.token_starts)

    def node_scores(self, scores: np.ndarray, chunk_lengths: Sequence[int], depth: int) -> np.ndarray:
        """Per tree node [B, N], the best passage score of the text it covers (0 for an empty node)."""
        per_token = np.repeat(scores, np.diff(np.append(self.token_starts, self.n_tokens)))
        node_spans_ = _chunk_node_spans(chunk_lengths, depth)
        out = np.zeros((len(node_spans_), node_spans_[0].shape[0]), dtype=np.float64)
        for b, spans in enumerate(node_spans_):
            for j, (s, e) in enumerate(spans):
                if e > s:
                    out[b, j] = per_token[s:e].max()
        return out


def _chunk_node_spans(chunk_lengths: Sequence[int], depth: int) -> list[np.ndarray]:
    """Document-token spans [N, 2] of every node of every chunk (no split noise: as served)."""
    starts = np.concatenate([[0], np.cumsum(chunk_lengths)[:-1]])
    return [node_spans(length, depth).numpy() + at for length, at in zip(chunk_lengths, starts, strict=True)]


def _unit(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] (all zeros when constant)."""
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


@dataclass(frozen=True)
class Ranking:
    """Scores of every passage for one question, and the order the budget is spent in."""

    scores: np.ndarray  # hybrid score per passage, in [0, 1 + tree_weight]
    priority: list[int]  # passage indices, most wanted first (no repeats)


def rank(
    index: PassageIndex,
    question: str,
    tree: np.ndarray | None,
    settings: EvidenceSettings,
) -> Ranking:
    """Order the passages for `question`; `tree` is the per-passage tree score (None: no tree)."""
    n = len(index)
    tree_unit = _unit(tree) if tree is not None else np.zeros(n)
    asked = terms([question])[0]
    lexical = index.lexical(asked)
    fits = max(1, settings.tokens // settings.passage_tokens)  # about how many passages the budget holds
    if settings.mode == "spread":
        return Ranking(tree_unit * settings.tree_weight, _spread(n, fits))
    if lexical.max() <= 0:
        # Nothing the question says occurs in the document: half by the tree, half spread out.
        by_tree = [int(i) for i in np.argsort(-tree_unit, kind="stable")]
        return Ranking(tree_unit, _interleave(by_tree, _spread(n, max(1, fits // 2))))
    scores = lexical / lexical.max() + settings.tree_weight * tree_unit
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    first: list[int] = [order[0]]
    used = set(asked)
    for _ in range(settings.hops):
        follow = index.rare_identifiers(first[-1], used, settings.hop_max_df)
        if not follow:
            break
        used.update(follow)
        hop = index.lexical(follow)
        hop[first] = 0.0
        best = int(hop.argmax())
        if hop[best] <= 0:
            break
        first.append(best)
        scores[best] = max(scores[best], float(scores[order[0]]))
    # Each lexical hit brings its neighbours, the text after it first: a question names what it
    # knows, and the answer tends to follow it (measured on the demo: "called his name Obed"
    # is one passage after the best match for "the son of Ruth and Boaz").
    hits = [i for i in order if lexical[i] > 0][: settings.neighbours_of]
    near = [j for i in hits for j in (i, i + 1, i - 1) if 0 <= j < n]
    floor = settings.min_score * float(scores.max())
    return Ranking(scores, list(dict.fromkeys(first + near + [i for i in order if scores[i] >= floor])))


def _spread(n: int, k: int) -> list[int]:
    """`k` passage indices evenly spaced over `n`, the first passage included."""
    k = min(k, n)
    return list(dict.fromkeys(int(i * n // k) for i in range(k)))


def _interleave(a: list[int], b: list[int]) -> list[int]:
    merged: list[int] = []
    for x, y in zip(a, b + [None] * max(0, len(a) - len(b)), strict=False):
        merged += [x] if y is None else [y, x]
    return list(dict.fromkeys(merged + a))


def choose(index: PassageIndex, ranking: Ranking, budget: int) -> list[Passage]:
    """Passages in priority order while their tokens fit `budget`, returned in document order."""
    chosen: list[int] = []
    used = 0
    for i in ranking.priority:
        s, e = index.spans[i]
        if used + (e - s) > budget:
            continue
        chosen.append(i)
        used += e - s
        if budget - used < 8:
            break
    return [index.passage(i, ranking.scores[i]) for i in sorted(chosen)]


def find_tokens(sequence: list[int], part: list[int], last: bool = False) -> int | None:
    """Where `part` starts in `sequence` (its first or last occurrence), or None."""
    starts = range(len(sequence) - len(part), -1, -1) if last else range(len(sequence) - len(part) + 1)
    return next((i for i in starts if sequence[i : i + len(part)] == part), None)


def question_span(prompt: list[int], tokenizer: Any, question: str) -> tuple[int, int]:
    """Positions [start, end) of the question's tokens in a templated prompt (their last occurrence):
    with excerpts in the window, the only part that reads the tree (shielded_spans).

    Found by token search rather than predicted, so it holds for any chat template that keeps the
    question's tokens as they tokenize alone (the default model's does; the suite checks it).
    Where one merges them with their neighbours, the whole prompt stands for the question (it reads
    the injection, the answer still does not), and a warning says so; serving and training alike.
    """
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    start = find_tokens(prompt, ids, last=True) if ids else None
    if start is None:
        _log.warning("the chat template changes the question's tokens; the whole prompt reads the injection")
        return (0, len(prompt))
    return (start, start + len(ids))


def shielded_spans(settings: EvidenceSettings, question: tuple[int, int], length: int) -> tuple[tuple[int, int], ...]:
    """With excerpts in the window, the positions that read no injection: everything before the
    question (system prompt, excerpts; unless inject_excerpts) and everything after it (the turn's
    end, the answer's prefix and the answer; unless inject_answer). Only the question reads the tree.

    Why (RULER-style suite, 8K and 32K, 6 samples per task, shipped adapter; evidence alone 84 / 81%):
    shielding only the excerpts and the generated answer scored 80 / 74%, because the template and
    answer-prefix tokens just before the answer read the tree and changed how it was written (a
    comma list that counted up, "1858957, 1858958, ...", where evidence alone wrote each number);
    shielding everything after the question too, 83 / 76%; everything but the question, 83 / 83%.
    Training (evidence-shaped examples) and perplexity shield through this same rule.
    """
    spans = [] if settings.inject_excerpts else [(0, question[0])]
    if not settings.inject_answer:
        spans.append((question[1], length))
    return tuple(spans)


def render_excerpts(passages: Sequence[Passage]) -> str:
    """The excerpts alone, as `render` lays them out, for a window with no question (language
    modelling: perplexity and training put them before the text to continue)."""
    return render(passages, "").rstrip() + "\n\n"


def render(passages: Sequence[Passage], question: str, documents: DocumentMap | None = None) -> str:
    """The user message: the excerpts (adjacent passages joined into one), then the question.

    With several documents (documents.several), each document's excerpts follow a header naming
    it, in the order the documents were given; a document with no excerpt gets no header.
    """
    if not passages:
        return question
    excerpts: list[tuple[int, str]] = []  # (document, text)
    last_end = -1
    for p in passages:
        k = documents.of_token(p.token_start) if documents is not None else 0
        if p.token_start == last_end and excerpts[-1][0] == k:
            excerpts[-1] = (k, excerpts[-1][1] + p.text)
        else:
            excerpts.append((k, p.text))
        last_end = p.token_end
    blocks: list[str] = []
    shown = None
    for k, text in excerpts:
        if documents is not None and documents.several and k != shown:
            blocks.append(documents.header(k))
            shown = k
        blocks.append(f"[...] {text.strip()} [...]")
    header = EXCERPTS_HEADER if documents is None or not documents.several else EXCERPTS_HEADER_SEVERAL
    return f"{header}\n\n" + "\n\n".join(blocks) + f"\n\n{question}"
