"""The methods every evaluation compares, and the one rule that relates two of them.

- `sharedllm`: the product: the tree injected, evidence passages in the window, the answer
  grounded as shipped (a quote of the document's best-ranked sentences);
- `facts`: the same window and tree, the model writing the answer with its facts copied from the
  document (grounding "facts");
- `free`: the same window and tree with free generation (no grounding, no loop guard, no sentence
  limit): the product before grounded answers, so that grounding is measured in the same run;
- `evidence`: the same passages with no tree injected: what the injection adds, and nothing else;
- `bm25`: plain retrieval, no tree at all: BM25 over ~100-token passages, the best ones until
  the same budget is full (no hops, no neighbours, no floor): the baseline a retrieval system
  gives without the method;
- `tree`: the tree alone, the window holding only the question (the paper's setting);
- `window`: no document at all; `truncation`: the last tokens that fit the window;
- `full`: the whole document in the window, only where it fits;
- `streaming`: StreamingLLM (attention sinks + a recent window).

`full` puts the whole document in the base window and `truncation` the last tokens that fit;
where the whole document fits they are the same run, so it is made once and serves both,
and beyond the window `full` does not exist (reported as n/a, never silently truncated).

Every method that reads the compressed document (`sharedllm`, `evidence`, `bm25`, `tree`) answers
grounded in it, as the product does; `free` does not, and neither do the base-window methods
(`window`, `truncation`, `full`, `streaming`), which are the base model as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, NamedTuple

from sharedllm.common.engine.params import EvidenceSettings, SamplingParams, free_generation

METHODS: tuple[str, ...] = (
    "sharedllm",
    "facts",
    "free",
    "evidence",
    "bm25",
    "tree",
    "window",
    "full",
    "truncation",
    "streaming",
)
# Perplexity ranks the evidence for the decoder segment's text, as for a question (ppl.py).
PPL_METHODS: tuple[str, ...] = ("sharedllm", "evidence", "tree", "window", "full", "truncation", "streaming")


class Reading(NamedTuple):
    """How a method reads the compressed document."""

    evidence: bool  # passages in the window
    inject: bool  # the tree through the cross-attention
    plain: bool = False  # passages ranked by plain BM25 (no tree score, no hops, no neighbours)
    grounding: str | None = None  # the answer's grounding, where not as shipped ("off": free_generation)


DOCUMENT_METHODS: dict[str, Reading] = {
    "sharedllm": Reading(evidence=True, inject=True),
    "facts": Reading(evidence=True, inject=True, grounding="facts"),
    "free": Reading(evidence=True, inject=True, grounding="off"),
    "evidence": Reading(evidence=True, inject=False),
    "bm25": Reading(evidence=True, inject=False, plain=True),
    "tree": Reading(evidence=False, inject=True),
}
PLAIN_PASSAGE_TOKENS = 96  # "about 100 tokens": the passages of the measured BM25 baseline


def method_params(reading: Reading, params: SamplingParams) -> SamplingParams:
    """The parameters a document method answers with: as shipped, or its own grounding."""
    if reading.grounding == "off":
        return free_generation(params)
    return params if reading.grounding is None else dataclasses.replace(params, grounding=reading.grounding)


def plain_bm25(settings: EvidenceSettings) -> EvidenceSettings:
    """The same budget spent on the best BM25 passages alone: the ranking without what the method
    adds. A question with no word in the document gets passages spread over it, as the product's do."""
    return dataclasses.replace(
        settings,
        passage_tokens=PLAIN_PASSAGE_TOKENS,
        tree_weight=0.0,
        hops=0,
        neighbours_of=0,
        min_score=0.0,
        mode="auto",
    )


def base_window_methods(wanted: Collection[str], fits: bool) -> tuple[str, ...]:
    """The methods one base-window run answers for: truncation when asked, full when asked and nothing was cut."""
    return tuple(m for m in ("truncation", "full") if m in wanted and (m == "truncation" or fits))


def baseline_protocol(methods: Collection[str], evidence: EvidenceSettings) -> dict[str, Any]:
    """What a report's protocol records beside the product's evidence settings: the baseline's own."""
    return {"bm25_evidence": dataclasses.asdict(plain_bm25(evidence))} if "bm25" in methods else {}
