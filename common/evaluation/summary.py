"""Summaries checked against their document, without reference summaries (docs/evaluation.md §6a).

What a reader asks of a summary of a long text, counted the same way for every method:
- does it name what the text is about: of the document's 10 most frequent names (salience.py:
  capitalised words that are neither common English words nor written in lower case by the
  document) and of its 10 most salient terms (frequent and spread across its sections), how many
  it mentions, with and without its first line (which lists main names or subjects by design);
- does it say what the text does not: names, and numbers, that the document never writes;
- does each sentence rest on its sources: *support* is the share of its sentences whose content
  words all appear in the document text at the spans the sentence cites (support.py). A summary
  that cites nothing (the base model's) is checked against the whole document, which is kinder;
- does it repeat itself: word 3-grams said more than once, and sentences said twice;
- its length, and the seconds it took.
Documents: held-out texts of each kind (narrative, reference, technical), each cut to its first
`max_tokens` tokens. Crude on purpose: counted, not judged.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sharedllm.common.errors import InvalidInput
from sharedllm.common.summaries.filters import split_sentences
from sharedllm.common.summaries.pipeline import Summary, SummarySettings, section_spans, summarize
from sharedllm.common.summaries.salience import Vocabulary, content_stems, frequent_names, salient_terms
from sharedllm.common.summaries.support import supported
from sharedllm.common.summaries.units import clean

TOP = 10
BASE_INSTRUCTION = "Summarize the document in a few sentences."
METHODS = ("extract", "rewrite", "base")  # the default pipeline, with the model joining, the base model on its window
# (kind, corpus, name): held out from training (common/data/corpora.py), chosen by kind before any was summarised.
HELDOUT_DOCUMENTS: tuple[tuple[str, str, str], ...] = (
    ("narrative", "austen", "persuasion"),
    ("narrative", "bible", "1 Samuel"),
    ("narrative", "bible", "Ruth"),
    ("reference", "pydocs", "library/os.path.rst"),
    ("reference", "pydocs", "library/statistics.rst"),
    ("reference", "pydocs", "c-api/sys.rst"),
    ("technical", "pydocs", "whatsnew/3.8.rst"),
    ("technical", "pydocs", "howto/enum.rst"),
    ("technical", "stdlib", "locale"),
    ("technical", "stdlib", "tempfile"),
)
_NUMBER = re.compile(r"\b\w*\d[\w.,]*\w|\b\d\b")
_WORD = re.compile(r"\w+(?:[.'’\-]\w+)*")


@dataclass(frozen=True)
class SummaryCheck:
    names: tuple[str, ...]  # the document's most frequent names
    names_mentioned: tuple[str, ...]
    names_in_body: int  # of those, mentioned after the first line
    terms: tuple[str, ...]  # its most salient terms
    terms_mentioned: tuple[str, ...]
    absent: tuple[str, ...]  # names and numbers of the summary that the document never writes
    sentences: int
    supported: int
    repeated_trigrams: int
    repeated_sentences: int
    words: int

    @property
    def support(self) -> float:
        return self.supported / self.sentences if self.sentences else 0.0

    @property
    def coverage(self) -> int:
        """Of the 10 most frequent names or terms, the larger count mentioned."""
        return max(len(self.names_mentioned), len(self.terms_mentioned))

    def to_dict(self) -> dict:
        return {**asdict(self), "support": round(self.support, 3), "coverage": self.coverage}


@dataclass(frozen=True)
class CheckedSentence:
    text: str
    spans: tuple[tuple[int, int], ...] | None  # None: cites nothing (checked against the document)


def _trigram_repeats(text: str) -> int:
    words = [w.lower() for w in _WORD.findall(text)]
    counts = Counter(zip(words, words[1:], words[2:], strict=False))
    return sum(n - 1 for n in counts.values() if n > 1)


def check_summary(document: str, first_line: str, sentences: Sequence[CheckedSentence], top: int = TOP) -> SummaryCheck:
    """The checks of the module docstring for a summary: its first line and its sentences."""
    vocabulary = Vocabulary.of(document)
    body = " ".join(s.text for s in sentences)
    whole = f"{first_line}\n\n{body}"
    names = frequent_names(document, top, vocabulary)
    used, used_in_body = vocabulary.names_in(whole), vocabulary.names_in(body)
    terms = salient_terms([clean(document[a:b]) for a, b in section_spans(document)], top)
    stems = content_stems(whole)
    document_numbers = {n.rstrip(".,") for n in _NUMBER.findall(document)}
    numbers = {n for n in _NUMBER.findall(whole) if n.rstrip(".,") not in document_numbers}
    whole_document = ((0, len(document)),)
    texts = [s.text for s in sentences]
    return SummaryCheck(
        names=names,
        names_mentioned=tuple(n for n in names if n in used),
        names_in_body=sum(n in used_in_body for n in names),
        terms=tuple(t.word for t in terms),
        terms_mentioned=tuple(t.word for t in terms if t.stem in stems),
        absent=tuple(sorted(vocabulary.unknown_names(whole) | numbers)),
        sentences=len(sentences),
        supported=sum(supported(s.text, document, s.spans or whole_document) for s in sentences),
        repeated_trigrams=_trigram_repeats(body),
        repeated_sentences=len(texts) - len(set(texts)),
        words=len(_WORD.findall(whole)),
    )


def check_pipeline(document: str, summary: Summary) -> SummaryCheck:
    return check_summary(document, summary.overview.text, [CheckedSentence(s.text, s.spans) for s in summary.sentences])


def check_text(document: str, text: str) -> SummaryCheck:
    """A summary that cites nothing: its sentences checked against the whole document."""
    return check_summary(document, "", [CheckedSentence(s, None) for s in split_sentences(text)])


@dataclass(frozen=True)
class SummaryDocument:
    kind: str  # the kind it was chosen as
    name: str
    text: str  # already cut to the evaluated length


def heldout_documents(
    data_dir, tokenizer, max_tokens: int, names: Sequence[str] | None = None
) -> list[SummaryDocument]:
    """HELDOUT_DOCUMENTS that are fetched (or only those named), each cut to its first max_tokens
    tokens (at a token boundary, decoded back to text)."""
    from sharedllm.common.data.corpora import find_entry, load_text, read_manifest

    fetched = {(e.corpus, e.name) for e in read_manifest(data_dir) if e.split == "heldout"}
    if names:
        unknown = set(names) - {name for _, _, name in HELDOUT_DOCUMENTS}
        if unknown:
            known = ", ".join(name for _, _, name in HELDOUT_DOCUMENTS)
            raise InvalidInput(f"no held-out document named {', '.join(sorted(unknown))} (known: {known})")
    documents = []
    for kind, corpus, name in HELDOUT_DOCUMENTS:
        if (corpus, name) not in fetched or (names and name not in names):
            continue
        text = load_text(data_dir, find_entry(data_dir, name, corpus))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        documents.append(SummaryDocument(kind, name, tokenizer.decode(ids)))
    if not documents:
        raise InvalidInput(f"{data_dir} holds none of the held-out documents; run `sharedllm data fetch` first")
    return documents


def evaluate_summaries(
    engine,
    documents: Sequence[SummaryDocument],
    words: int,
    methods: Sequence[str] = METHODS,
    baseline_tokens: int = 8192,
) -> dict:
    """Per document and method: the summary, its checks and its seconds. "extract" and "rewrite"
    are the product's pipeline (rewrite: compression included, the model joins the sentences);
    "base" is the base model asked for a summary of the document's first tokens that fit its
    window (`baseline_tokens` at most), with as many tokens to write as the bound asks."""
    from sharedllm.common.engine.engine import QuestionPlan
    from sharedllm.common.engine.params import SamplingParams
    from sharedllm.common.engine.results import run_to_end
    from sharedllm.common.runtime import ContextRuntime
    from sharedllm.common.store import open_store
    from sharedllm.common.summaries.pipeline import writing_params

    runtime = ContextRuntime(engine, open_store("memory://"), decoded_cache_bytes=0)
    rows = []
    for doc in documents:
        row: dict = {"document": doc.name, "chosen_as": doc.kind, "tokens": len(engine.tokenize_document(doc.text))}
        for method in methods:
            started = time.perf_counter()
            if method == "base":
                max_new = writing_params(words).max_new_tokens
                suffix = f"\n\n{BASE_INSTRUCTION}"
                room = min(baseline_tokens, engine.window) - max_new - len(engine.prompt_ids(suffix)) - 16
                head = engine.tokenizer.decode(engine.tokenizer(doc.text, add_special_tokens=False)["input_ids"][:room])
                head = head[: engine.limits.max_prompt_chars - len(suffix)]
                params = SamplingParams(
                    max_new_tokens=max_new, repetition_penalty=1.1, grounding="off", max_sentences=0
                )
                text = run_to_end(engine.decode(QuestionPlan(engine.prompt_ids(head + suffix)), params)).text.strip()
                row[method] = {**check_text(doc.text, text).to_dict(), "summary": text}
            else:
                write = None
                if method == "rewrite":
                    context_id = runtime.compress_text(doc.text).context_id

                    def write(prompt: str, params: SamplingParams, context_id: str = context_id) -> str:
                        return run_to_end(runtime.generate(context_id, prompt, params, evidence_tokens=0)).text

                summary = summarize(doc.text, write, SummarySettings(words=words, rewrite=method == "rewrite"))
                row["detected"] = f"{summary.kind} ({summary.detail})"
                row[method] = {
                    **check_pipeline(doc.text, summary).to_dict(),
                    "summary": summary.text,
                    "model_sentences": sum(s.origin == "model" for s in summary.sentences),
                    "refused": len(summary.refused),
                }
            row[method]["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
    return {"words": words, "methods": list(methods), "documents": rows}


def format_table(report: dict) -> str:
    head = f"{'document':<22} {'kind':<10} {'tokens':>6}"
    cells = "  names terms absent support rep3 words     s"
    lines = [head + "".join(f" | {m:^{len(cells) - 3}}" for m in report["methods"]), " " * len(head)]
    lines[1] += "".join(f" |{cells}" for _ in report["methods"])
    for row in report["documents"]:
        line = f"{row['document'][:22]:<22} {row['chosen_as']:<10} {row['tokens']:>6}"
        for m in report["methods"]:
            c = row[m]
            names = f"{len(c['names_mentioned'])}/{len(c['names'])}"
            terms = f"{len(c['terms_mentioned'])}/{len(c['terms'])}"
            line += (
                f" |  {names:>5} {terms:>5} {len(c['absent']):>6} {c['support']:>7.0%}"
                f" {c['repeated_trigrams']:>4} {c['words']:>5} {c['seconds']:>5.1f}"
            )
        lines.append(line)
    return "\n".join(lines)
