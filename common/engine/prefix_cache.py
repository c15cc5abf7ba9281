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
answer that reuses them is, on the CPU, the same to the bit as one that does not (on a GPU,
within the rounding of its kernels). Entries are found by their exact tokens (no hash to
collide), within a scope (the tenant: one tenant's prompts never answer for another's), and the
least recently used go first when their bytes pass the budget. A lookup marks the blocks it
found as used from the last to the first, so a prompt's first block outlives the blocks after
it (they cannot be found without it); blocks left unreachable are the least recently used, the
next to go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from sharedllm.common.engine.llama import KVCache

DEFAULT_PREFIX_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class CachedBlock:
    """One block's keys and values, every layer: [n_layers, n_kv, block, head_dim] each."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def read(cls, cache: KVCache, start: int, end: int) -> CachedBlock:
        """A copy of positions [start, end) of a one-row cache."""
        return cls(cache.keys[:, 0, :, start:end].clone(), cache.values[:, 0, :, start:end].clone())

    def write(self, cache: KVCache, start: int) -> None:
        """Put the block at positions start.. of a one-row cache."""
        end = start + self.keys.shape[2]
        cache.keys[:, 0, :, start:end] = self.keys
        cache.values[:, 0, :, start:end] = self.values

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class PrefixCache:
    """Whole prompt blocks by their leading tokens, least recently used first out (see the module doc).

    Not thread-safe: the scheduler calls it under its lock (a lookup moves what it finds to the
    recent end, so it changes the order too).
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
        found: list[tuple[tuple[Hashable, tuple[int, ...]], CachedBlock]] = []
        for end in range(block, usable + 1, block):
            key = (scope, tuple(tokens[:end]))
            cached = self._blocks.get(key)
            if cached is None:
                break
            found.append((key, cached))
        for key, _ in reversed(found):  # the first block most recently used: it goes last
            self._blocks.move_to_end(key)
        self.reused_blocks += len(found)
        return [cached for _, cached in found]

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

    def touch(self, scope: Hashable, tokens: Sequence[int]) -> bool:
        """Mark the block that ends `tokens` as used; whether it is kept."""
        key = (scope, tuple(tokens))
        if key not in self._blocks:
            return False
        self._blocks.move_to_end(key)
        return True
