"""The optional packages (pyproject's extras) some commands and flags need, checked up front.

Why up front: a flag such as `bench --plot-dir` uses its package only at the end of a run that
may take an hour; checked when the command starts, a missing package costs one line naming the
extra to install, not a traceback after the work. Availability is looked up with
`importlib.util.find_spec`, which finds the package without importing it.
"""

from __future__ import annotations

import importlib.util

from sharedllm.common.errors import SharedLLMError

# Packages a command's own module imports -> the extra that brings them (`batch` and `worker`).
COMMAND_EXTRAS = {"celery": "batch", "kombu": "batch"}


class MissingExtra(SharedLLMError):
    """An optional package that the command line asked for is not installed."""


def install_hint(package: str, extra: str) -> str:
    return f"{package}: pip install 'sharedllm[{extra}]'"


def require(flag: str, package: str, extra: str) -> None:
    """Raise MissingExtra, naming `flag` and the extra, unless `package` is installed."""
    if importlib.util.find_spec(package) is None:
        raise MissingExtra(f"{flag} needs {install_hint(package, extra)}")
