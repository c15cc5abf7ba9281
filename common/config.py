"""Plain configuration values: the context tree, the model to load, and the documented limits.

TreeConfig is one frozen dataclass because the compressor and the decoder must agree on every
field: it travels inside the adapter's sidecar and inside every stored context's manifest.
Nothing here imports torch, so that every front end can parse and check its flags cheaply.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sharedllm.common.errors import InvalidInput

Encoding = Literal["single_pass", "per_node"]
Pooling = Literal["last", "mean"]
Positions = Literal["chunk", "none"]

ENCODINGS: tuple[str, ...] = ("single_pass", "per_node")
POOLINGS: tuple[str, ...] = ("last", "mean")
POSITIONS: tuple[str, ...] = ("chunk", "none")


class ConfigError(InvalidInput, ValueError):
    """A configuration value is out of range or inconsistent: bad input, so every front end
    reports it as one line (exit 2, INVALID_ARGUMENT), never a traceback."""


@dataclass(frozen=True)
class TreeConfig:
    """How documents are compressed and how the decoder reads them (docs/method.md §2-4).

    n_layers:   M, the number of bottom layers that compress (lower model) and inject (upper).
    chunk_size: C, tokens per chunk; each chunk is the root of one context tree.
    depth:      D, levels below the root; level l holds 2**l nodes.
    pool_size:  P, entries kept per node and layer after pooling.
    encoding:   `single_pass` encodes a chunk once and cuts nodes out of it; `per_node`
                encodes every node as its own sequence (positions restart at 0).
    pooling:    `last` keeps the last entry of each block (it has seen the whole block under
                causal attention); `mean` averages the block.
    positions:  `chunk` rotates the keys of chunk j by RoPE position j and the injection
                queries by the number of chunks; `none` applies no chunk-level rotation.
    """

    n_layers: int = 4
    chunk_size: int = 1024
    depth: int = 3
    pool_size: int = 32
    encoding: Encoding = "single_pass"
    pooling: Pooling = "last"
    positions: Positions = "chunk"

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ConfigError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.depth < 1 or self.depth > 8:
            raise ConfigError(f"depth must be in [1, 8], got {self.depth}")
        if self.chunk_size < 2**self.depth:
            raise ConfigError(f"chunk_size ({self.chunk_size}) must be at least 2**depth ({2**self.depth})")
        if self.pool_size < 1:
            raise ConfigError(f"pool_size must be >= 1, got {self.pool_size}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    @property
    def nodes_per_chunk(self) -> int:
        """Stored nodes per chunk: levels 1..D (the root is never selected, so never stored)."""
        return node_count(self.depth)

    @property
    def selected_per_chunk(self) -> int:
        """Nodes one question reads per chunk: one kept node per level plus two leaves."""
        return self.depth + 1

    @property
    def compression_ratio(self) -> float:
        """Document tokens per injected entry for a full chunk."""
        return self.chunk_size / (self.selected_per_chunk * self.pool_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TreeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown tree config fields: {sorted(unknown)}")
        return cls(**data)


def node_count(depth: int) -> int:
    """Nodes of levels 1..depth in one chunk's tree."""
    return 2 ** (depth + 1) - 2


def node_index(level: int, position: int) -> int:
    """Index of node `position` of `level` (1-based levels) in a chunk's flat node table."""
    return (2**level - 2) + position


def cache_root() -> Path:
    """The per-user folder for what the product makes for itself (converted models, the demo
    document): $SHAREDLLM_CACHE_DIR, else ~/.cache/sharedllm."""
    return Path(os.environ.get("SHAREDLLM_CACHE_DIR") or Path.home() / ".cache" / "sharedllm")


DEFAULT_MAX_DOCUMENT_TOKENS = 131_072
DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")  # auto: bf16 on GPUs, fp32 on CPUs


@dataclass(frozen=True)
class Limits:
    """Documented limits every front end enforces through the engine."""

    max_document_tokens: int = DEFAULT_MAX_DOCUMENT_TOKENS
    max_prompt_chars: int = 32_768
    # Contexts one question may read together; their tokens together stay within max_document_tokens.
    max_contexts_per_question: int = 64

    def __post_init__(self) -> None:
        for name in ("max_document_tokens", "max_prompt_chars", "max_contexts_per_question"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelChoice:
    """Which base model and adapter to load, where and in what precision (None: the defaults:
    SmolLM2-135M-Instruct, its shipped adapter, cuda if available, the device's dtype).

    Only a description: the engine layer loads it (`Engine.from_choice`), so that describing
    and checking a choice needs no torch and this module never imports the engine that imports it.
    """

    model: str | None = None
    adapter: str | None = None
    device: str | None = None
    dtype: str = "auto"
    max_document_tokens: int | None = None  # None: 131072, or fewer where chunk positions would pass the window

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r}")
        if self.max_document_tokens is not None:
            Limits(max_document_tokens=self.max_document_tokens)  # checks it where the choice is made, not at load

    @property
    def limits(self) -> Limits | None:
        return None if self.max_document_tokens is None else Limits(max_document_tokens=self.max_document_tokens)
