"""Synthetic long-document tasks: facts hidden at a chosen token depth in filler text.

Kinds, for instruction-style training and for the retrieval evaluations
(docs/evaluation.md, "Needle and passkey retrieval" and "RULER-style suite"):
- `passkey`: the classic "The pass key is K. Remember it. K is the pass key." line;
- `needle`: RULER's single needle in natural text ("One of the special magic numbers for
  {key} is: {value}."), with distractor keys, several values per key or several keys asked;
- `records`: several people's records (city, job, locker code), one field of one asked;
- `variables`: RULER's variable tracking, a chain of assignments "VAR B = VAR A" starting
  from a value, all names that end up holding the value asked for.
A haystack made only of other needles (RULER's multi-key with distractor needles) is a
`Filler` over `needle_haystack_text`.

Lengths and depths are in tokens of the tokenizer the model uses, because that is what the
model's window counts: the filler is fitted sentence by sentence to the target length, and
each fact is inserted at the sentence boundary nearest its depth. Depth is the fact's first
token index over (document tokens - fact tokens): 0 opens the document, 1 ends it. Every
task is a pure function of its seed and arguments.
"""

from __future__ import annotations

import hashlib
import random
import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sharedllm.common.data.shards import encode
from sharedllm.common.errors import InvalidInput

REPETITIVE_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Word lists for keys, names and record fields, chosen to be unlikely in a book haystack.
# fmt: off
_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
    "lively", "mellow", "narrow", "odd", "pale", "quiet", "rapid", "rusty", "silent", "tidy", "upbeat",
    "vivid", "wary", "wicked", "young", "zesty", "bitter", "cosmic", "frozen", "golden", "hidden", "lunar",
    "noisy", "polar", "royal", "sunny", "velvet", "woolly"
)
_NOUNS = (
    "anchor", "badger", "canyon", "dagger", "engine", "falcon", "glacier", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "teapot",
    "umbrella", "valley", "walrus", "yacht", "zebra", "beacon", "cactus", "dolphin", "ember", "fossil",
    "garnet", "helmet", "igloo", "juniper", "kiosk", "ladder"
)
_FIRST_NAMES = (
    "Amara", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Keiko",
    "Luca", "Marisol", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Soren", "Tamsin", "Ulrich", "Vera",
    "Wendell", "Ximena", "Yusuf", "Zelda"
)
_SURNAMES = (
    "Abernathy", "Baptiste", "Castellanos", "Drummond", "Eriksen", "Fairweather", "Gallagher", "Holloway",
    "Ibarra", "Jablonski", "Kowalczyk", "Lindqvist", "Marchetti", "Nakamura", "Okafor", "Pellegrini",
    "Quist", "Rasmussen", "Szabo", "Thackeray", "Underhill", "Vasquez", "Whitcombe", "Yamaguchi",
    "Zimmerman"
)
_CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Montreal", "Osaka", "Valparaiso", "Krakow", "Marrakesh", "Adelaide",
    "Reykjavik", "Hanoi", "Tbilisi", "Cartagena", "Bergen", "Winnipeg", "Seville"
)
_JOBS = (
    "baker", "glassblower", "cartographer", "beekeeper", "locksmith", "violinist", "pharmacist", "surveyor",
    "tailor", "astronomer", "ferryman", "bookbinder", "welder", "botanist", "clockmaker", "stonemason"
)
# fmt: on

# "Mr. Elliot" must not end a sentence: the word before a full stop is checked against these.
_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Ms", "Dr", "St", "Messrs", "Col", "Capt", "Gen", "Lt", "Jr", "Sr"})
# A sentence ends at . ! or ? (and any closing quotes or brackets) before a space and a capital,
# a digit or an opening quote; lower-case continuations ("Yes!" said he) stay in one sentence.
_SENTENCE_END = re.compile(r"""[.!?]["'\u2019\u201d)\]]*(?=\s+["'\u2018\u201c(\[]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` with whitespace collapsed; a paragraph without a full stop is one unit.

    Paragraphs are separated by blank lines, so a heading such as "Chapter 3" becomes its
    own unit instead of gluing onto the next sentence.
    """
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        start = 0
        for match in _SENTENCE_END.finditer(flat):
            word = flat[start : match.start()].rsplit(" ", 1)[-1]
            if word in _ABBREVIATIONS:
                continue
            sentences.append(flat[start : match.end()].strip())
            start = match.end()
        if flat[start:].strip():
            sentences.append(flat[start:].strip())
    return sentences


class Filler:
    """A haystack: the sentences of a text and their token counts, computed once and reused.

    `text` is any string, typically a held-out book; without one, the classic repetitive
    filler is used. Counting each sentence with its leading space matches the count of the
    joined text for byte-level BPE tokenizers, so lengths can be planned without
    re-tokenizing the whole document for every choice.
    """

    def __init__(self, tokenizer: Any, text: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.sentences: tuple[str, ...] = tuple(split_sentences(REPETITIVE_FILLER if text is None else text))
        if not self.sentences:
            raise InvalidInput("the filler text has no sentences")
        self.counts: tuple[int, ...] = tuple(len(ids) for ids in encode(tokenizer, [" " + s for s in self.sentences]))

    def count(self, text: str) -> int:
        """Tokens of `text` alone, without special tokens."""
        return len(encode(self.tokenizer, [text])[0])


@dataclass(frozen=True)
class Task:
    """One long-document question.

    answer:   the expected answer; several values are joined with ", " (each is also in
              metadata["answers"], and exact-match scoring should test each one).
    depth:    the requested depth of the first queried fact (see the module docstring).
    metadata: kind, seed, target and actual token counts, the answer prefix that starts a
              completion ("The pass key is"), and per fact its text, token start, token
              count, measured depth and whether the question asks for it.
    """

    document: str
    question: str
    answer: str
    depth: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Fact:
    text: str
    depth: float
    queried: bool


def _fit_tail(filler: Filler, sentence: str, budget: int) -> str:
    """The longest word-suffix of `sentence` whose tokens fit `budget` (binary search over words)."""
    words = sentence.split(" ")
    low, high = 0, len(words)  # words[-low:] fits; words[-(high + 1):] would not
    while low < high:
        mid = (low + high + 1) // 2
        if filler.count(" " + " ".join(words[-mid:])) <= budget:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[-low:]) if low else ""


def _filler_run(filler: Filler, budget: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """A contiguous run of filler sentences from a random start that fills `budget` tokens.

    Whole sentences are taken forwards, then backwards while they fit (wrapping around a
    short text); the last gap is filled by the tail of the sentence before the run, so the
    document opens mid-sentence like an excerpt and every later boundary ends a sentence.
    """
    n = len(filler.sentences)
    first = rng.randrange(n)
    run: list[int] = []
    total = 0
    after, before = first, first - 1
    while total + filler.counts[after % n] <= budget:
        run.append(after % n)
        total += filler.counts[after % n]
        after += 1
    while total + filler.counts[before % n] <= budget:
        run.insert(0, before % n)
        total += filler.counts[before % n]
        before -= 1
    pieces = [filler.sentences[k] for k in run]
    counts = [filler.counts[k] for k in run]
    tail = _fit_tail(filler, filler.sentences[before % n], budget - total)
    if tail:
        pieces.insert(0, tail)
        counts.insert(0, filler.count(" " + tail))
    return pieces, counts


def _slots(counts: Sequence[int], facts: Sequence[_Fact], fact_counts: Sequence[int]) -> dict[int, list[int]]:
    """For each boundary between filler pieces (0 = document start), the facts inserted there.

    Facts go in depth order; each one's target is its depth in document tokens minus the
    facts already placed before it, and it takes the nearest boundary at or after the
    previous fact's.
    """
    boundaries = [0]
    for c in counts:
        boundaries.append(boundaries[-1] + c)
    planned = boundaries[-1] + sum(fact_counts)
    slots: dict[int, list[int]] = {}
    earlier = 0  # tokens of the facts placed so far
    k_min = 0
    for i, fact in sorted(enumerate(facts), key=lambda item: item[1].depth):
        target = fact.depth * (planned - fact_counts[i]) - earlier
        k = min(bisect_left(boundaries, target), len(boundaries) - 1)
        if k > 0 and target - boundaries[k - 1] < boundaries[k] - target:
            k -= 1
        k_min = max(k, k_min)
        slots.setdefault(k_min, []).append(i)
        earlier += fact_counts[i]
    return slots


def _render(pieces: Sequence[str], slots: dict[int, list[int]], facts: Sequence[_Fact]) -> tuple[str, dict[int, int]]:
    """The document text and each fact's character offset in it."""
    items: list[tuple[int | None, str]] = []
    for k in range(len(pieces) + 1):
        items += [(i, facts[i].text) for i in slots.get(k, ())]
        if k < len(pieces) and pieces[k]:
            items.append((None, pieces[k]))
    offsets: dict[int, int] = {}
    chars = 0
    for i, text in items:
        if i is not None:
            offsets[i] = chars
        chars += len(text) + 1
    return " ".join(text for _, text in items), offsets


def _assemble(
    filler: Filler, length: int, facts: Sequence[_Fact], rng: random.Random
) -> tuple[str, int, list[dict[str, Any]]]:
    """Fit filler to `length` tokens around the facts, insert each at its depth, and measure the result."""
    fact_counts = [filler.count(" " + f.text) for f in facts]
    budget = length - sum(fact_counts)
    if budget < 0:
        raise InvalidInput(f"{length} tokens cannot hold the facts ({sum(fact_counts)} tokens)")
    pieces, counts = _filler_run(filler, budget, rng)
    slots = _slots(counts, facts, fact_counts)
    document, offsets = _render(pieces, slots, facts)
    # Sentence-wise counts can differ from the joined text's by a token at the start; drop
    # words from the opening filler until the whole document fits.
    first = 0
    while (tokens := filler.count(document)) > length and first < len(pieces):
        pieces[first] = " ".join(pieces[first].split(" ")[1:])
        first += not pieces[first]
        document, offsets = _render(pieces, slots, facts)

    placed = []
    for i, fact in enumerate(facts):
        start = filler.count(document[: offsets[i]].rstrip(" ")) if offsets[i] else 0
        span = fact_counts[i]
        placed.append(
            {
                "text": fact.text,
                "token_start": start,
                "tokens": span,
                "depth": start / max(tokens - span, 1),
                "queried": fact.queried,
            }
        )
    return document, tokens, placed


def _task(
    kind: str,
    filler: Filler,
    length: int,
    depth: float,
    seed: int,
    rng: random.Random,
    facts: Sequence[_Fact],
    question: str,
    answers: Sequence[str],
    answer_prefix: str,
) -> Task:
    document, tokens, placed = _assemble(filler, length, facts, rng)
    return Task(
        document=document,
        question=question,
        answer=", ".join(answers),
        depth=depth,
        metadata={
            "kind": kind,
            "seed": seed,
            "length": length,
            "tokens": tokens,
            "answers": list(answers),
            "answer_prefix": answer_prefix,
            "facts": placed,
        },
    )


def _check(length: int, depth: float) -> None:
    if length < 1:
        raise InvalidInput(f"length must be >= 1 token, got {length}")
    if not 0.0 <= depth <= 1.0:
        raise InvalidInput(f"depth must be in [0, 1], got {depth}")


def passkey_task(filler: Filler, length: int, depth: float, seed: int, digits: int = 5) -> Task:
    """The classic passkey: a `digits`-digit number stated once at `depth`, then asked for."""
    _check(length, depth)
    rng = random.Random(seed)
    key = str(rng.randrange(10 ** (digits - 1), 10**digits))
    fact = _Fact(f"The pass key is {key}. Remember it. {key} is the pass key.", depth, True)
    return _task("passkey", filler, length, depth, seed, rng, [fact], "What is the pass key?", [key], "The pass key is")


def _distinct(rng: random.Random, count: int, make: Callable[[random.Random], str]) -> list[str]:
    """`count` distinct values drawn from `make(rng)`."""
    values: list[str] = []
    while len(values) < count:
        value = make(rng)
        if value not in values:
            values.append(value)
    return values


def _magic_number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def needle_task(
    filler: Filler,
    length: int,
    depth: float,
    seed: int,
    n_distractors: int = 0,
    n_values: int = 1,
    n_queries: int = 1,
) -> Task:
    """RULER's needle: "One of the special magic numbers for {key} is: {value}." with a 7-digit value.

    n_distractors: further keys with their own numbers, never asked (RULER's multi-key).
    n_values:      numbers per asked key; all are expected (multi-value).
    n_queries:     keys asked in one question (multi-query).
    The first number of the first asked key sits at `depth`; every other needle at a
    seeded random depth.
    """
    _check(length, depth)
    if n_distractors < 0 or n_values < 1 or n_queries < 1:
        raise InvalidInput("needle_task needs n_distractors >= 0, n_values >= 1 and n_queries >= 1")
    rng = random.Random(seed)
    keys = _distinct(rng, n_queries + n_distractors, _word_key)
    values = _distinct(rng, n_queries * n_values + n_distractors, _magic_number)
    facts: list[_Fact] = []
    answers: list[str] = []
    for k, key in enumerate(keys):
        asked = k < n_queries
        for _ in range(n_values if asked else 1):
            value = values.pop()
            fact_depth = depth if not facts else rng.random()
            facts.append(_Fact(f"One of the special magic numbers for {key} is: {value}.", fact_depth, asked))
            if asked:
                answers.append(value)
    asked_keys = _join(keys[:n_queries])
    if len(answers) == 1:
        question = f"What is the special magic number for {asked_keys} mentioned in the provided text?"
        prefix = f"The special magic number for {asked_keys} mentioned in the provided text is"
    else:
        question = f"What are all the special magic numbers for {asked_keys} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked_keys} mentioned in the provided text are"
    return _task("needle", filler, length, depth, seed, rng, facts, question, answers, prefix)


def records_task(filler: Filler, length: int, depth: float, seed: int, n_records: int = 4) -> Task:
    """Several people's records (city, job, locker code); one field of the record at `depth` is asked.

    The other records have the same shape at seeded random depths, so the answer must be
    read from the right person's record, not from the only number in sight.
    """
    _check(length, depth)
    if n_records < 1:
        raise InvalidInput(f"n_records must be >= 1, got {n_records}")
    rng = random.Random(seed)
    names = _distinct(rng, n_records, lambda r: f"{r.choice(_FIRST_NAMES)} {r.choice(_SURNAMES)}")
    codes = _distinct(rng, n_records, _magic_number)
    facts = []
    records = []
    for i, name in enumerate(names):
        city, job = rng.choice(_CITIES), rng.choice(_JOBS)
        records.append((name, city, job, codes[i]))
        text = f"{name} lives in {city}, works as a {job}, and has the locker code {codes[i]}."
        facts.append(_Fact(text, depth if i == 0 else rng.random(), i == 0))
    name, city, job, code = records[0]
    question, answer, prefix = rng.choice(
        [
            (f"In which city does {name} live?", city, f"{name} lives in"),
            (f"What does {name} work as?", job, f"{name} works as a"),
            (f"What is the locker code of {name}?", code, f"The locker code of {name} is"),
        ]
    )
    return _task("records", filler, length, depth, seed, rng, facts, question, [answer], prefix)


def needle_haystack_text(seed: int, sentences: int = 6000) -> str:
    """A haystack of nothing but needles for keys that are never asked (RULER's multi-key 2).

    Their keys are a name and a city ("greta-oslo"), so they never equal an asked
    adjective-noun key, but they read exactly like the needle that is asked for.
    """
    rng = random.Random(seed)
    lines = [
        f"One of the special magic numbers for {rng.choice(_FIRST_NAMES).lower()}-{rng.choice(_CITIES).lower()} "
        f"is: {_magic_number(rng)}."
        for _ in range(sentences)
    ]
    return " ".join(lines)


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def variables_task(filler: Filler, length: int, depth: float, seed: int, hops: int = 4) -> Task:
    """RULER's variable tracking: "VAR A = 12345." then `hops` assignments "VAR B = VAR A." in
    document order, the first at `depth`, the rest after it at seeded depths; every name that
    holds the value is expected."""
    _check(length, depth)
    if hops < 1:
        raise InvalidInput(f"hops must be >= 1, got {hops}")
    rng = random.Random(seed)
    names = _distinct(rng, hops + 1, _variable_name)
    value = str(rng.randrange(10_000, 100_000))
    later = sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops))
    facts = [_Fact(f"VAR {names[0]} = {value}.", depth, True)]
    facts += [_Fact(f"VAR {names[i + 1]} = VAR {names[i]}.", d, True) for i, d in enumerate(later)]
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
        f"are assigned the value {value}, they are:"
    )
    return _task("variables", filler, length, depth, seed, rng, facts, question, names, prefix)


_KINDS = {"passkey": passkey_task, "needle": needle_task, "records": records_task, "variables": variables_task}


def generate_tasks(
    kind: str,
    filler: Filler,
    lengths: Sequence[int],
    depths: Sequence[float],
    per_cell: int,
    seed: int,
    **options: int,
) -> Iterator[Task]:
    """`per_cell` tasks for every (length, depth), e.g. for an accuracy heat map or a training set.

    Each task's seed is derived from (seed, length, depth, repetition), so a cell's tasks do
    not change when the grid around it does.
    """
    if kind not in _KINDS:
        raise InvalidInput(f"unknown task kind {kind!r}; expected one of {', '.join(_KINDS)}")
    for length in lengths:
        for depth in depths:
            for rep in range(per_cell):
                digest = hashlib.sha256(f"{kind}:{seed}:{length}:{depth!r}:{rep}".encode()).digest()
                yield _KINDS[kind](filler, length, depth, int.from_bytes(digest[:8], "big"), **options)
