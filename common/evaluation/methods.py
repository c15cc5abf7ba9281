"""The methods every evaluation compares, and the one rule that relates two of them.

`full` puts the whole document in the base window and `truncation` the last tokens that fit;
where the whole document fits they are the same run, so it is made once and serves both,
and beyond the window `full` does not exist (reported as n/a, never silently truncated).
"""

from __future__ import annotations

from collections.abc import Collection

METHODS: tuple[str, ...] = ("sharedllm", "window", "full", "truncation", "streaming")


def base_window_methods(wanted: Collection[str], fits: bool) -> tuple[str, ...]:
    """The methods one base-window run answers for: truncation when asked, full when asked and nothing was cut."""
    return tuple(m for m in ("truncation", "full") if m in wanted and (m == "truncation" or fits))
