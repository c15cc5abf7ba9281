"""The loop guard: an answer that starts to repeat itself ends before the repeat.

A small model that has said what it knows often says it again, and again, until the token cap
("The answer is 5. The answer is 5. The answer is ..."). A repetition penalty stops that, but it
also stops the model from copying the document, which is what a grounded answer does. So the
guard looks only at the answer: when its last `min_run` tokens or more also occur earlier in
it, the answer is looping; it ends there (finish reason "repetition") without the repeated run.

The tokens that could be the start of such a run (the longest tail of the answer that occurs
earlier in it) are held back from the stream until the tail stops matching, so that nothing
the guard removes has been sent. In ordinary text that tail is a token or two ("the", ","), so
the stream's delay is a token or two.
"""

from __future__ import annotations

DEFAULT_MIN_RUN = 8  # tokens: ". The special magic number for" (7) repeats legitimately in a list


class LoopGuard:
    """Watches one answer's tokens; min_run <= 0 turns the guard off (every token is released at once)."""

    def __init__(self, min_run: int = DEFAULT_MIN_RUN) -> None:
        self.min_run = min_run
        self._ids: list[int] = []
        self._at: dict[int, list[int]] = {}  # token -> where it occurs in the answer
        self._released = 0
        self.looped = False

    def push(self, token: int) -> list[int]:
        """Add a token; return the tokens that can no longer be part of a repeat (release them).

        Once the answer loops (`looped`), nothing more is released and the held tokens are dropped.
        """
        if self.looped:
            return []
        held = self._repeated_tail(token) if self.min_run > 0 else 0
        self._at.setdefault(token, []).append(len(self._ids))
        self._ids.append(token)
        if held >= self.min_run > 0:
            # The tail grows by at most one token a step, so everything dropped here was held back.
            self.looped = True
            del self._ids[len(self._ids) - held :]
            return []
        return self._release(len(self._ids) - held)

    def flush(self) -> list[int]:
        """The end of the answer: everything held is released (unless the answer looped)."""
        return [] if self.looped else self._release(len(self._ids))

    def _release(self, upto: int) -> list[int]:
        out = self._ids[self._released : upto]
        self._released = max(self._released, upto)
        return out

    def _repeated_tail(self, token: int) -> int:
        """With `token` appended: the length of the longest tail that also ends at an earlier position
        (overlap allowed), counted up to min_run (enough to decide)."""
        ids, last = self._ids, len(self._ids)
        best = 0
        for end in self._at.get(token, ()):
            n = 1
            while n < self.min_run and n <= end and ids[end - n] == ids[last - n]:
                n += 1
            best = max(best, n)
        return best
