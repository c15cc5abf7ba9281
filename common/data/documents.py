"""Reading a user's document from a file: UTF-8 text, not empty, not binary, within a size limit."""

from __future__ import annotations

from pathlib import Path

from sharedllm.common.errors import InvalidInput


def read_text(path: Path, max_bytes: int) -> str:
    """The file's text. InvalidInput says what is wrong as a predicate ("is empty", "contains NUL
    bytes...") for the caller to put after the document's name; OSError when it cannot be read."""
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidInput(f"is {size} bytes; the limit is {max_bytes}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if "\x00" in text:
        raise InvalidInput("contains NUL bytes: binary, not text")
    if not text.strip():
        raise InvalidInput("is empty")
    return text
