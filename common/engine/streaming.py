"""Incremental detokenisation with stop strings.

Text is released only when it can no longer change: not while the last token ends inside
a multi-byte character, and not while the tail could still grow into a stop string.

Each step decodes only a short window of tokens: the tokens since the last complete piece of
text plus the few before them (`_prefix`..`_read`), which give the tokenizer the context it
needs for spacing; decoding everything generated so far at every step would cost O(n^2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens already turned into text
        self._read = 0  # tokens before this index are in `_full`
        self._full = ""  # text of ids[:_read]
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""  # inside a multi-byte character, or nothing printable yet
        self._full += window[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._settle(final=False)

    def flush(self) -> str:
        """Release everything left (end of generation), still cutting at a stop string."""
        if self.stopped:
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        self._full += self._decode(self._ids[self._prefix :])[len(before) :]
        self._read = len(self._ids)
        return self._settle(final=True)

    def _settle(self, final: bool) -> str:
        cut = self._first_stop(self._full)
        if cut is not None:
            self.stopped = True
            return self._release(self._full[:cut])
        keep = 0 if final else self._holdback(self._full)
        return self._release(self._full[: len(self._full) - keep])

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
