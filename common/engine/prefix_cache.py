"""Keys and values of prompt blocks already read, for later prompts that begin the same way.

A question asked again (a retry, a popular question, a batch job run twice) builds the same
prompt: the system prompt and the same excerpts before the question. Reading those tokens again
is most of the time to the first token, and it is compute-bound, so the scheduler keeps what it
read, block by block (Decoder.step_rows's attention blocks), and a later prompt with the same
leading tokens starts after them.

A block is kept and reused only when it is whole, lies before the prompt's last token (whose
logits the answer needs) and reads no injection (Decoder._hook: before the question, with
excerpts in the window). Its keys and values then depend on its tokens and the tokens before
it, nothing else, and step_rows computes them in the same blocks whoever reads the prompt, so an
answer that reuses them is the same to the bit as one that does not. Entries are found by their
exact tokens (no hash to collide), within a scope (the tenant: one tenant's prompts never answer
for another's), and the least recently used go first when their bytes pass the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_PREFIX_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class CachedBlock:
    """One block's keys and values, every layer: [n_layers, n_kv, block, head_dim] each."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class PrefixCache:
    """Whole prompt blocks by their leading tokens, least recently used first out (see the module doc).

    Not thread-safe: the scheduler's thread alone adds, the answers' threads read under its lock.
    """

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.reused_blocks = 0
        self._blocks: OrderedDict[tuple[Hashable, tuple[int, ...]], CachedBlock] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, scope: Hashable, tokens: Sequence[int], usable: int, block: int) -> list[CachedBlock]:
        """The cached blocks that start `tokens`, in order, all within its first `usable` tokens."""
        found: list[CachedBlock] = []
        for end in range(block, usable + 1, block):
            key = (scope, tuple(tokens[:end]))
            cached = self._blocks.get(key)
            if cached is None:
                break
            self._blocks.move_to_end(key)
            found.append(cached)
        self.reused_blocks += len(found)
        return found

    def add(self, scope: Hashable, tokens: Sequence[int], cached: CachedBlock) -> None:
        """Keep the block that ends `tokens` (all of them: its own and those before it)."""
        if cached.nbytes > self.max_bytes:
            return
        key = (scope, tuple(tokens))
        previous = self._blocks.pop(key, None)
        if previous is not None:
            self.bytes -= previous.nbytes
        self._blocks[key] = cached
        self.bytes += cached.nbytes
        while self.bytes > self.max_bytes:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.nbytes

    def __contains__(self, item: tuple[Hashable, Sequence[int]]) -> bool:
        scope, tokens = item
        return (scope, tuple(tokens)) in self._blocks
