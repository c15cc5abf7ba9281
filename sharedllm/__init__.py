"""SharedLLM: answer questions about documents far longer than a short-window model's window.

The entry points live here (`sharedllm.cli`); the library and the two services are the design
card's folders `common/`, `compressor_service/` and `decoder_service/`, imported as
`sharedllm.common`, `sharedllm.compressor_service` and `sharedllm.decoder_service` so that they
cannot collide with another project's `common` (docs/architecture.md, "Layers").

An installed distribution places those folders inside this package (pyproject's package-dir).
A source checkout used without installing (PYTHONPATH=checkout, as the accelerator scripts run
it) has them beside this folder; a finder maps exactly those three names there.
"""

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent
_FOLDERS = ("common", "compressor_service", "decoder_service")


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds sharedllm.<folder> in the checkout for each of the design card's folders."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, folder = fullname.partition(".")
        if prefix != __name__ or folder not in _FOLDERS:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [str(_CHECKOUT)])


if (_CHECKOUT / "common" / "__init__.py").is_file() and not (_HERE / "common").exists():
    sys.meta_path.append(_CheckoutFolders())
