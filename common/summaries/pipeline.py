"""One summarization pipeline: the document's central sentences, joined by the model only when
asked (`rewrite`), every sentence kept only if the document supports it. Used by `sharedllm
summarize`, batch jobs and `eval summary`.

Why this shape (measured in docs/summaries.md). A 135M model asked to summarise a long text
writes freely, and what it writes freely it invents: names, places, dates, "the text above".
Studies of long documents find concatenated section notes the weakest summaries. So the summary
is built from the document's own sentences:

1. *Sections*: the document in sections of about 6,000 characters; its units (sentences, entry
   lines, docstrings) each with a character span (units.py); its salient terms and names
   (salience.py); its kind and what it covers, the summary's first line (kinds.py).
2. *Extract*: the units that together cover the salient terms across sections (extract.py),
   twice the summary's word bound of them when the model is to join them, the bound itself when
   it is not (`rewrite=False`).
3. *Groups, then the whole*: the extracted units in groups of at most `call_chars` characters
   (about 1.5K tokens with the instruction), each group one model call asked for its share of the
   bound; when there is more than one group, their sentences are joined the same way, level
   after level, until one call makes the whole. The model writes with grounded decoding (numbers
   and names copied from the document) and the document's tree injected.
4. *Keep what is supported*: each sentence the model writes is split off, refused if its form
   is wrong (filters.py: questions, sentences about the task, loops, repeats, unknown names) or
   if any of its content words is not in the sources it was given (support.py); a kept sentence
   cites the spans of the sources it rests on. Where the model's kept sentences fall short of half
   a group's share, the group's extracted units fill it, as they are.
5. *Bound*: the sentences in document order, the least salient dropped until the whole,
   first line included, is within `words`.

The cost is bounded by the summary's length, not the document's: without `rewrite` no model call
at all; with it, a 200-word summary of a 32K- or a 128K-token document is one call of about 1.2K
tokens in and 320 out. The model's raw
outputs are returned with the summary; given back as `done`, they replace the calls they
answered, so a batch task that died resumes where it was and makes the same summary.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.errors import InvalidInput
from sharedllm.common.summaries import extract, filters, kinds
from sharedllm.common.summaries.salience import Vocabulary, content_stems, frequent_names, salient_terms
from sharedllm.common.summaries.support import Source, Span, cover
from sharedllm.common.summaries.units import Unit, clean, prose_of_code, units

DEFAULT_WORDS = 200
MIN_WORDS, MAX_WORDS = 40, 2000
SECTION_CHARS = 6000  # about 1,500 tokens of English
CALL_CHARS = 4500  # extracted text per model call: with the instruction, about 1.2K tokens of English
POOL_FACTOR = 2  # words extracted for the model per word of summary
TOKENS_PER_WORD = 1.6  # a call's token budget per word asked (English runs about 1.3)
TERMS = 40
TOP_NAMES = 10
REFERENCE_PROSE_WEIGHT = 0.5  # a reference work's other sentences, beside its entries' definitions
INSTRUCTION = "Summarize the sentences above in at most {words} words. Keep their names and numbers."
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+")
_WORD = re.compile(r"\w+(?:[.'’\-]\w+)*")

# (prompt, sampling parameters) -> the model's text, about the document being summarised.
Writer = Callable[[str, SamplingParams], str]


@dataclass(frozen=True)
class SummarySettings:
    """What a summary is asked to be; the same settings give the same summary anywhere."""

    words: int = DEFAULT_WORDS  # the bound on its length, first line included
    instruction: str | None = None  # what to focus on ("Focus on the risks."): its words weigh more
    rewrite: bool = False  # True: the model joins the extracted sentences (measured: README, "Summaries")
    section_chars: int = SECTION_CHARS
    call_chars: int = CALL_CHARS

    def __post_init__(self) -> None:
        if not MIN_WORDS <= self.words <= MAX_WORDS:
            raise InvalidInput(f"words must be in [{MIN_WORDS}, {MAX_WORDS}], got {self.words}")
        if self.section_chars < 200:
            raise InvalidInput(f"section_chars must be >= 200, got {self.section_chars}")
        if not 500 <= self.call_chars <= 20_000:
            raise InvalidInput(f"call_chars must be in [500, 20000], got {self.call_chars}")
        if self.instruction is not None and len(self.instruction) > 500:
            raise InvalidInput(f"instruction must be at most 500 characters, got {len(self.instruction)}")


@dataclass(frozen=True)
class SummarySentence:
    text: str
    spans: tuple[Span, ...]  # the document's [start, end) character spans it rests on
    origin: str  # "overview" (the first line), "model" (written by the model) or "extract" (the document's)

    def to_dict(self) -> dict:
        return {"text": self.text, "spans": [list(s) for s in self.spans], "origin": self.origin}


@dataclass(frozen=True)
class Summary:
    kind: str
    detail: str
    overview: SummarySentence
    sentences: tuple[SummarySentence, ...]
    calls: tuple[str, ...] = ()  # the model's outputs, in call order
    refused: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (sentence, why), model's

    @property
    def text(self) -> str:
        return self.overview.text + "\n\n" + " ".join(s.text for s in self.sentences)

    @property
    def words(self) -> int:
        return len(_WORD.findall(self.text))

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "detail": self.detail,
            "text": self.text,
            "words": self.words,
            "sentences": [s.to_dict() for s in (self.overview, *self.sentences)],
            "model_calls": len(self.calls),
            "refused": [{"sentence": s, "why": why} for s, why in self.refused],
        }


def section_spans(text: str, max_chars: int = SECTION_CHARS) -> list[tuple[int, int]]:
    """Consecutive sections of at most max_chars, cut between paragraphs where one ends in the
    second half, else between sentences there, else at white space."""
    spans: list[tuple[int, int]] = []
    start, end = 0, len(text)
    while end - start > max_chars:
        window = text[start : start + max_chars]
        cuts = [m.end() for m in _PARAGRAPH_BREAK.finditer(window)] or [
            m.end() for m in _SENTENCE_BREAK.finditer(window)
        ]
        cut = cuts[-1] if cuts and cuts[-1] >= max_chars // 2 else window.rfind(" ") + 1 or max_chars
        spans.append((start, start + cut))
        start += cut
    spans.append((start, end))
    return [s for s in spans if text[s[0] : s[1]].strip()]


def writing_params(words: int) -> SamplingParams:
    """How the model writes a call's sentences: greedy, grounded on the document's facts, a light
    repetition penalty, no sentence limit, room for `words` words."""
    return SamplingParams(
        max_new_tokens=max(16, math.ceil(words * TOKENS_PER_WORD)),
        repetition_penalty=1.1,
        grounding="facts",
        max_sentences=0,
    )


def _words(text: str) -> int:
    return len(_WORD.findall(text))


@dataclass(frozen=True)
class _Item:
    """A sentence in play at some level: its text and what it rests on."""

    text: str
    source: Source
    origin: str


class _Calls:
    """The model's calls in order: replayed from `done` first, then made."""

    def __init__(self, write: Writer, done: Sequence[str], on_call: Callable[[list[str]], None] | None) -> None:
        self.write, self.outputs, self.on_call, self.made = write, list(done), on_call, 0

    def __call__(self, prompt: str, params: SamplingParams) -> str:
        if self.made < len(self.outputs):
            out = self.outputs[self.made]
        else:
            out = self.write(prompt, params).strip()
            self.outputs.append(out)
            if self.on_call is not None:
                self.on_call(list(self.outputs))
        self.made += 1
        return out


def summarize(
    text: str,
    write: Writer | None,
    settings: SummarySettings | None = None,
    done: Sequence[str] = (),
    on_call: Callable[[list[str]], None] | None = None,
) -> Summary:
    """The document's summary. write: the model, about this document (None: extract only);
    done: outputs of calls made before (a resumed task); on_call(outputs): after each new call."""
    settings = settings or SummarySettings()
    if not text.strip():
        raise InvalidInput("the document is empty")
    kind = kinds.classify(text)
    source_code = kind.detail == "source code"
    prose = prose_of_code(text) if source_code else text  # what code says in words: docstrings, comments
    sections = section_spans(text, settings.section_chars)
    terms = salient_terms([clean(prose[a:b]) for a, b in sections], TERMS)
    vocabulary = Vocabulary.of(text)
    names = list(frequent_names(text, TOP_NAMES, vocabulary))
    first_line, named = kinds.overview(text, kind, terms, names)
    overview = SummarySentence(first_line, _first_occurrences(text, named), "overview")
    budget = settings.words - _words(first_line)
    if budget < 10:
        raise InvalidInput(f"words={settings.words} leaves no room after the summary's first line")
    starts = [a for a, _ in sections]
    pool = extract.candidates(units(prose), starts, narrative=kind.kind == "narrative")
    if kind.kind == "reference":  # its entries speak first, the most mentioned weighing most
        heads = tuple(e.headword for e in kind.entries)
        pool = extract.candidates(kinds.entry_units(text, list(kind.entries)), starts, False, entries=True) + [
            dataclasses.replace(c, quality=c.quality * REFERENCE_PROSE_WEIGHT) for c in pool
        ]
        names = kinds.most_mentioned(text, heads, TOP_NAMES)
    rewrite = settings.rewrite and write is not None
    focus = content_stems(settings.instruction or "")
    chosen = extract.select(pool, terms, names, budget * POOL_FACTOR if rewrite else budget, focus)
    items = [_Item(c.unit.text, _unit_source(c.unit, c.stems), "extract") for c in chosen]
    calls: _Calls | None = None
    refused: list[tuple[str, str]] = []
    if rewrite:
        assert write is not None
        calls = _Calls(write, done, on_call)
        items = _levels(items, calls, settings, budget, vocabulary, refused)
    weights = {t.stem: t.weight for t in terms}
    kept = _bounded(_unrepeated(items), weights, budget)
    sentences = tuple(SummarySentence(i.text, i.source.spans, i.origin) for i in kept)
    return Summary(kind.kind, kind.detail, overview, sentences, tuple(calls.outputs) if calls else (), tuple(refused))


def _unit_source(unit: Unit, stems: frozenset[str]) -> Source:
    return Source(((unit.start, unit.end),), stems)


def _first_occurrences(text: str, named: Sequence[str]) -> tuple[Span, ...]:
    spans = []
    for item in named:
        at = text.find(item)
        if at >= 0:
            spans.append((at, at + len(item)))
    return tuple(sorted(spans))


def _groups(items: Sequence[_Item], call_chars: int) -> list[list[_Item]]:
    groups: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + len(item.text) + 1 > call_chars:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item.text) + 1
    return [g for g in groups if g]


def _levels(
    items: list[_Item],
    calls: _Calls,
    settings: SummarySettings,
    budget: int,
    vocabulary: Vocabulary,
    refused: list[tuple[str, str]],
) -> list[_Item]:
    """Groups, then the whole: each level's sentences are the next level's sources."""
    if not items:
        return items  # nothing was extracted: nothing to join
    while True:
        groups = _groups(items, settings.call_chars)
        share = budget if len(groups) == 1 else max(MIN_WORDS, math.ceil(1.5 * budget / len(groups)))
        written: list[_Item] = []
        for group in groups:
            written += _joined(group, calls, settings, share, vocabulary, refused)
        if len(groups) == 1 or sum(len(w.text) for w in written) >= sum(len(i.text) for i in items):
            return written  # one call made the whole, or a level said no less than its input
        items = written


def _joined(
    group: list[_Item],
    calls: _Calls,
    settings: SummarySettings,
    share: int,
    vocabulary: Vocabulary,
    refused: list[tuple[str, str]],
) -> list[_Item]:
    """One call: the group's sentences joined by the model into at most `share` words, only the
    supported ones kept, the group's own sentences filling what falls short of half the share."""
    instruction = INSTRUCTION.format(words=share)
    if settings.instruction:
        instruction += " " + settings.instruction
    prompt = "\n".join(item.text for item in group) + "\n\n" + instruction
    output = calls(prompt, writing_params(share))
    sources = [item.source for item in group]
    kept: list[_Item] = []
    for sentence in filters.split_sentences(output):
        why = filters.rejection(sentence, vocabulary, (k.source.stems for k in kept))
        spans = None if why else cover(sentence, sources)
        if spans is None:
            refused.append((sentence, why or "says what its sources do not"))
            continue
        stems = frozenset(content_stems(sentence))
        kept.append(_Item(sentence, Source(spans, stems), "model"))
    words = sum(_words(k.text) for k in kept)
    if words < share / 2:
        cited = {span for k in kept for span in k.source.spans}
        for item in group:
            if words >= share:
                break
            if not cited.issuperset(item.source.spans):
                kept.append(item)
                words += _words(item.text)
    return kept


def _unrepeated(items: Sequence[_Item]) -> list[_Item]:
    """In document order, without a sentence most of whose content an earlier one already said."""
    out: list[_Item] = []
    for item in sorted(items, key=lambda i: i.source.spans[0] if i.source.spans else (0, 0)):
        said = (o.source.stems for o in out)
        if not filters.repeats(item.source.stems, said) and item.text not in {o.text for o in out}:
            out.append(item)
    return out


def _bounded(items: list[_Item], weights: dict[str, float], budget: int) -> list[_Item]:
    """Within `budget` words: the sentence worth least per word dropped, until it fits."""
    items = list(items)
    while items and sum(_words(i.text) for i in items) > budget:
        worth = [sum(weights.get(s, 0.0) for s in sorted(i.source.stems)) / max(1, _words(i.text)) for i in items]
        items.pop(worth.index(min(worth)))
    return items
