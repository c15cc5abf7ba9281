"""Finished spans as a person reads them: one line per span, indented under its parent, with its
duration, each span's children in the order they started.

For a process that shows its own trace instead of (or besides) exporting it, e.g. after keeping
its spans with the SDK's InMemorySpanExporter. A span whose parent is not among the spans given
(the caller's span, from TRACEPARENT) is shown as a root.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

INDENT = "  "


def format_tree(spans: Iterable[ReadableSpan]) -> str:
    """`name  duration ms` per span, names indented by depth and padded so the durations align."""
    spans = list(spans)
    ids = {span.context.span_id for span in spans}
    children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children[parent].append(span)
    rows: list[tuple[str, float]] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(children[parent], key=lambda s: s.start_time):
            rows.append((INDENT * depth + span.name, (span.end_time - span.start_time) / 1e6))
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {ms:9.1f} ms" for label, ms in rows)
