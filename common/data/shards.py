"""Token shards: a split's documents tokenized once per tokenizer, cached, and sampled as spans.

Tokenizing the corpora takes about a minute on two cores, so it happens once per tokenizer:
`data_dir/shards/<fingerprint>/` holds, per (split, corpus), one uint32 `.npy` with the
documents back to back and a JSON index of where each document starts. The index records
which fetched texts it was built from, so a re-fetch that changed any text rebuilds that
shard rather than serving stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharedllm.common.data.corpora import SPLITS, ManifestEntry, find_entry, load_text, read_manifest
from sharedllm.common.errors import InvalidInput

INDEX_VERSION = 1
_BATCH_CHARS = 4_000_000  # characters per tokenizer call: enough for a fast tokenizer's threads, bounded memory


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides the token ids: the tokenizer's JSON, or its vocabulary.

    Fast tokenizers serialize their whole pipeline (normalizer, pre-tokenizer, merges,
    added tokens); slow ones fall back to the vocabulary with the class name.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens, as a language model reads running text."""
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


@dataclass(frozen=True)
class ShardDocument:
    """Where one document's tokens lie: `length` tokens from `start` in its corpus's shard."""

    name: str
    corpus: str
    start: int
    length: int


class TokenShards:
    """The tokens of one split, memory-mapped; build or load with `load_shards`."""

    def __init__(self, directory: Path, split: str, indexes: Sequence[dict[str, Any]]) -> None:
        self.split = split
        self.documents: tuple[ShardDocument, ...] = tuple(
            ShardDocument(**d) for index in indexes for d in index["documents"]
        )
        self._arrays = {index["corpus"]: np.load(directory / index["file"], mmap_mode="r") for index in indexes}

    @property
    def n_tokens(self) -> int:
        """Tokens in the split, all loaded corpora together."""
        return sum(int(a.shape[0]) for a in self._arrays.values())

    def tokens(self, document: ShardDocument) -> np.ndarray:
        """One document's token ids (a read-only view into the memory map)."""
        return self._arrays[document.corpus][document.start : document.start + document.length]

    def document(self, name: str, corpus: str | None = None) -> ShardDocument:
        """A document of this split by name (and corpus where names collide)."""
        matches = [d for d in self.documents if d.name == name and corpus in (None, d.corpus)]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise InvalidInput(f"{what} document {name!r} in the {self.split} shards")
        return matches[0]


def _sources_digest(entries: Sequence[ManifestEntry]) -> str:
    listing = [[e.name, e.sha256] for e in entries]
    return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()


def _batches(entries: Sequence[ManifestEntry]) -> Iterator[list[ManifestEntry]]:
    """Consecutive groups of about `_BATCH_CHARS` characters (one long document may exceed it)."""
    batch: list[ManifestEntry] = []
    chars = 0
    for entry in entries:
        batch.append(entry)
        chars += entry.chars
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _build(
    directory: Path, data_dir: Path, split: str, corpus: str, entries: Sequence[ManifestEntry], tokenizer: Any
) -> dict[str, Any]:
    """Tokenize one corpus of a split; the array is written first, the index last (it marks completion)."""
    directory.mkdir(parents=True, exist_ok=True)
    pieces: list[np.ndarray] = []
    documents: list[dict[str, Any]] = []
    start = 0
    for batch in _batches(entries):
        for entry, ids in zip(batch, encode(tokenizer, [load_text(data_dir, e) for e in batch]), strict=True):
            pieces.append(np.asarray(ids, dtype=np.uint32))
            documents.append({"name": entry.name, "corpus": corpus, "start": start, "length": len(ids)})
            start += len(ids)
    stem = f"{split}-{corpus}"
    np.save(directory / f"{stem}.tmp.npy", np.concatenate(pieces))
    os.replace(directory / f"{stem}.tmp.npy", directory / f"{stem}.npy")
    index = {
        "version": INDEX_VERSION,
        "tokenizer": directory.name,
        "split": split,
        "corpus": corpus,
        "sources": _sources_digest(entries),
        "file": f"{stem}.npy",
        "documents": documents,
    }
    (directory / f"{stem}.json.tmp").write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
    os.replace(directory / f"{stem}.json.tmp", directory / f"{stem}.json")
    return index


def load_shards(
    data_dir: str | os.PathLike[str], split: str, tokenizer: Any, corpora: Sequence[str] | None = None
) -> TokenShards:
    """The split's token shards for this tokenizer; a corpus is tokenized only when its cache is stale.

    Each (split, corpus) is cached on its own, so asking for a subset of corpora neither
    builds nor invalidates the others.
    """
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = Path(data_dir)
    entries = [e for e in read_manifest(root) if e.split == split and (corpora is None or e.corpus in corpora)]
    if not entries:
        raise InvalidInput(f"the {split} split of {root} has no documents of corpora {corpora}")
    directory = root / "shards" / tokenizer_fingerprint(tokenizer)
    indexes = []
    for corpus in dict.fromkeys(e.corpus for e in entries):
        members = [e for e in entries if e.corpus == corpus]
        path = directory / f"{split}-{corpus}.json"
        index = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if index is None or index.get("version") != INDEX_VERSION or index["sources"] != _sources_digest(members):
            index = _build(directory, root, split, corpus, members, tokenizer)
        indexes.append(index)
    return TokenShards(directory, split, indexes)


def load_document_tokens(
    data_dir: str | os.PathLike[str], name: str, tokenizer: Any, corpus: str | None = None
) -> np.ndarray:
    """One fetched document's tokens by name (e.g. "persuasion"), from the cached shards of its split."""
    entry = find_entry(data_dir, name, corpus)
    shards = load_shards(data_dir, entry.split, tokenizer)
    return shards.tokens(shards.document(entry.name, entry.corpus))


class SpanSampler:
    """Random contiguous spans of `length` tokens from one split, for language-model training.

    Every start position that keeps a span inside one document is equally likely, so long
    documents contribute in proportion to their length and no span crosses a document
    boundary; documents shorter than `length` are never drawn. The generator is seeded, so
    the same seed gives the same stream of batches.
    """

    def __init__(self, shards: TokenShards, length: int, seed: int, corpora: Sequence[str] | None = None) -> None:
        if length < 1:
            raise InvalidInput(f"span length must be >= 1, got {length}")
        self._shards = shards
        self.length = length
        self._documents = [
            d for d in shards.documents if d.length >= length and (corpora is None or d.corpus in corpora)
        ]
        if not self._documents:
            raise InvalidInput(f"no document of the {shards.split} split has {length} tokens")
        starts = np.array([d.length - length + 1 for d in self._documents], dtype=np.float64)
        self._weights = starts / starts.sum()
        self._rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restart the stream from another seed (a resumed run must not replay its first spans)."""
        self._rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> np.ndarray:
        """A (batch_size, length) int64 array of token ids."""
        out = np.empty((batch_size, self.length), dtype=np.int64)
        picks = self._rng.choice(len(self._documents), size=batch_size, p=self._weights)
        for row, pick in enumerate(picks):
            document = self._documents[pick]
            offset = int(self._rng.integers(0, document.length - self.length + 1))
            out[row] = self._shards.tokens(document)[offset : offset + self.length]
        return out
