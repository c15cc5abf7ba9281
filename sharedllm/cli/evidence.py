"""The excerpts an answer read, as a user reads them under it (`--evidence` of ask and generate)."""

from __future__ import annotations

from collections.abc import Sequence

from sharedllm.common.engine.results import Passage


def format_evidence(passages: Sequence[Passage]) -> str:
    """Where each excerpt is in the document, then its text."""
    lines = [f"evidence: {len(passages)} passages, {sum(p.n_tokens for p in passages)} tokens"]
    for p in passages:
        lines.append(
            f"  [chars {p.char_start}-{p.char_end}, tokens {p.token_start}-{p.token_end}, score {p.score:.2f}]"
        )
        lines += [f"    {line}" for line in p.text.strip().splitlines() if line.strip()]
    return "\n".join(lines)
