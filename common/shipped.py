"""The adapters shipped with the package (common/adapters/NAME/adapter.safetensors), found by name.

Kept apart from the engine so that every command's help can list them without loading torch.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sharedllm.common.errors import InvalidInput

SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"


def default_adapter_path() -> Path:
    """The shipped default adapter for the default model (may not exist yet)."""
    return SHIPPED_ADAPTERS / "default" / "adapter.safetensors"


@functools.cache
def shipped_adapter_names() -> tuple[str, ...]:
    """Names of the adapters shipped for the default model (directories of common/adapters);
    listed once per process: every command's help and every name lookup asks."""
    return tuple(sorted(d.name for d in SHIPPED_ADAPTERS.iterdir() if (d / "adapter.safetensors").is_file()))


def adapter_help(unset: str) -> str:
    """Help of an --adapter flag; `unset` says what leaving it out means."""
    names = ", ".join(shipped_adapter_names())
    return f"an adapter .safetensors file, or the name of a shipped one ({names}); unset: {unset}"


def adapter_file(adapter: str | Path) -> Path:
    """The file behind --adapter: an existing path, else a shipped adapter's name, else a path.

    Names let users and service flags pick a shipped adapter without knowing where the package
    is installed; an existing file of the same name still wins, so no path that worked stops
    working.
    """
    path = Path(adapter)
    text = str(adapter)
    if path.exists() or not text or "/" in text or "." in text:
        return path
    names = shipped_adapter_names()
    if text not in names:
        raise InvalidInput(
            f"no adapter file {text!r} and no shipped adapter of that name (shipped: {', '.join(names)})"
        )
    return SHIPPED_ADAPTERS / text / "adapter.safetensors"
