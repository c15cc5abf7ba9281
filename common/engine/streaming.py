"""Incremental detokenisation with stop strings.

Text is released only when it can no longer change: not while the last token ends inside
a multi-byte character, and not while the tail could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final (possibly empty)."""
        self._ids.append(token_id)
        full = self._decode(self._ids)
        if full.endswith("\ufffd"):
            return ""
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._release(full[:cut])
        return self._release(full[: len(full) - self._holdback(full)])

    def flush(self) -> str:
        """Release everything left (end of generation without a stop string)."""
        if self.stopped:
            return ""
        full = self._decode(self._ids)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._release(full[:cut])
        return self._release(full)

    def _release(self, final: str) -> str:
        delta = final[self._emitted :]
        self._emitted = max(self._emitted, len(final))
        self.text = final if len(final) >= len(self.text) else self.text
        return delta

    def _first_stop(self, full: str) -> int | None:
        # A stop string may straddle already-emitted text by at most its length - 1.
        hits = [full.find(s, max(0, self._emitted - len(s) + 1)) for s in self._stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _holdback(self, full: str) -> int:
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(full)), longest, -1):
                if full.endswith(s[:n]):
                    longest = n
                    break
        return longest
