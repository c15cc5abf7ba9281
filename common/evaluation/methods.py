"""The methods every evaluation compares, and the one rule that relates two of them.

- `sharedllm`: the product: the tree injected and evidence passages in the window;
- `evidence`: the same passages with no tree (a retrieval baseline with the same budget);
- `tree`: the tree alone, the window holding only the question (the paper's setting);
- `window`: no document at all; `truncation`: the last tokens that fit the window;
- `full`: the whole document in the window, only where it fits;
- `streaming`: StreamingLLM (attention sinks + a recent window).

`full` puts the whole document in the base window and `truncation` the last tokens that fit;
where the whole document fits they are the same run, so it is made once and serves both,
and beyond the window `full` does not exist (reported as n/a, never silently truncated).
"""

from __future__ import annotations

from collections.abc import Collection

METHODS: tuple[str, ...] = ("sharedllm", "evidence", "tree", "window", "full", "truncation", "streaming")
# Perplexity ranks the evidence for the decoder segment's text, as for a question (ppl.py).
PPL_METHODS: tuple[str, ...] = ("sharedllm", "evidence", "tree", "window", "full", "truncation", "streaming")
# The methods that read the compressed document, and how: (evidence in the window, tree injected).
DOCUMENT_METHODS: dict[str, tuple[bool, bool]] = {
    "sharedllm": (True, True),
    "evidence": (True, False),
    "tree": (False, True),
}


def base_window_methods(wanted: Collection[str], fits: bool) -> tuple[str, ...]:
    """The methods one base-window run answers for: truncation when asked, full when asked and nothing was cut."""
    return tuple(m for m in ("truncation", "full") if m in wanted and (m == "truncation" or fits))
