"""The excerpts an answer read and what it quoted, as a user reads them under it (`--evidence` of
ask and generate), and the spans a summary's sentences rest on (`summarize --evidence`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sharedllm.common.engine.results import Citation, Passage
from sharedllm.common.summaries.pipeline import Summary


def format_evidence(passages: Sequence[Passage], names: Mapping[str, str] | None = None) -> str:
    """Where each excerpt is in its document, then its text. names: what to call each context id
    (a question across several documents: their file names); otherwise the id itself."""
    lines = [f"evidence: {len(passages)} passages, {sum(p.n_tokens for p in passages)} tokens"]
    several = len({p.context_id for p in passages}) > 1 or names is not None
    for p in passages:
        where = _document(p.context_id, names) + ", " if several and p.context_id is not None else ""
        lines.append(
            f"  [{where}chars {p.char_start}-{p.char_end}, tokens {p.token_start}-{p.token_end}, score {p.score:.2f}]"
        )
        lines += [f"    {line}" for line in p.text.strip().splitlines() if line.strip()]
    return "\n".join(lines)


def _document(context_id: str, names: Mapping[str, str] | None) -> str:
    return (names or {}).get(context_id, f"context {context_id}")


def format_citations(answer: str, citations: Sequence[Citation], names: Mapping[str, str] | None = None) -> str:
    """The answer with [n] after each run the document states word for word, then where each run is."""
    if not citations:
        return "quotes: none (no run of the answer is stated word for word in the document)"
    marked, at = [], 0
    for n, c in enumerate(citations, 1):
        marked += [answer[at : c.answer_end], f"[{n}]"]
        at = c.answer_end
    lines = ["quoted: " + "".join([*marked, answer[at:]]).strip()]
    for n, c in enumerate(citations, 1):
        where = "outside the excerpts" if c.evidence_index is None else f"excerpt {c.evidence_index + 1}"
        document = _document(c.context_id, names) + ", " if names is not None and c.context_id is not None else ""
        text = " ".join(c.text.split())
        lines.append(f"  [{n}] {document}chars {c.char_start}-{c.char_end} ({where}): {text}")
    return "\n".join(lines)


def format_sources(document: str, summary: Summary) -> str:
    """Each sentence of the summary, numbered, with the document's spans it rests on."""
    lines = ["sources:"]
    for n, sentence in enumerate((summary.overview, *summary.sentences), 1):
        lines.append(f"  [{n}] ({sentence.origin}) {sentence.text}")
        for start, end in sentence.spans:
            excerpt = " ".join(document[start:end].split())
            lines.append(f"      chars {start}-{end}: {excerpt[:200] + ' ...' if len(excerpt) > 200 else excerpt}")
    return "\n".join(lines)
