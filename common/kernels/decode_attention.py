"""The compiled CPU kernel for the attention of decoding rows (decode_attention.cpp).

Why: in a decode step of 8 or 16 rows on the CPU, torch's attention, called row by row over each
row's own cache, was 42 to 52% of the step and read the caches at about a third of the machine's
read bandwidth (`python bench/step_roofline.py`). The kernel takes every decoding row of a layer
in one call and reads each cached key and value once for all the query heads that share it.

It is built by torch's extension builder (ninja and a C++ compiler) the first time a process
asks for it, for this machine's CPU (`-march=native`), into torch's extensions directory
(`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`). The build's name holds a hash
of the source, the flags, torch, Python and the CPU's features (`build_name`), so a directory
shared by machines or environments never loads another's build, and a later process loads it in
well under a second. Where it cannot be built (no compiler, a directory it cannot write), `load` logs
why once and returns None, and the decoder keeps torch's attention: slower, and answers that may
differ in the last bits.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cpp")
# -fno-trapping-math lets the compiler vectorise the softmax's exp; not -ffast-math, whose
# start-up code can set flush-to-zero for the whole process that loads the library.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
HEAD_DIMS = (8, 16, 32, 64, 128)  # the sizes the source is compiled for
MAX_GROUP = 8  # query heads per key/value head
BUILD_TIMEOUT_S = 120.0  # a build takes about 25 s on 2 cores; a lock older than this was abandoned


def _cpu_features() -> str:
    """The CPU's feature flags, which `-march=native` compiles for."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_name() -> str:
    """The extension's name: changes with anything that changes the machine code or what it links
    to (the source, the flags, torch and where it is installed, Python, the CPU), so two
    environments sharing a build root never load or overwrite each other's build."""
    digest = hashlib.sha256()
    parts = (SOURCE.read_bytes(), " ".join(FLAGS), torch.__version__, torch.__file__, sys.version, _cpu_features())
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
    return f"sharedllm_decode_attention_{digest.hexdigest()[:16]}"


def build_directory(name: str) -> Path:
    """Where the build goes: `TORCH_EXTENSIONS_DIR` if set (the image points it at the cache
    volume), else torch's default root. torch reads that variable only when it picks the folder
    itself; this module names the folder, so it must read it too."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the ninja package (a dependency) installs it in its
    environment's scripts folder, which a caller's PATH may not hold (a virtual environment used
    without activating it, as `make test` does)."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


_LOADING = threading.Lock()


def load() -> ModuleType | None:
    """The compiled kernel, built on the first call in a process if no build is there yet; None
    (and a warning, once) where it cannot be built. Callers in several threads wait for one build."""
    with _LOADING:
        return _build()


def clear_abandoned_lock(lock: Path, timeout_s: float = BUILD_TIMEOUT_S, poll_s: float = 1.0) -> None:
    """Wait for a build another process is running, and remove its lock if it is older than any
    build takes: torch's builder waits forever on the lock of a process that died building (a
    server killed while it warmed up, in a volume that outlives it)."""
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > timeout_s:
            log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


@functools.cache
def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    started = time.perf_counter()
    try:
        name = build_name()
        _ninja_on_path()
        directory = build_directory(name)
        directory.mkdir(parents=True, exist_ok=True)
        clear_abandoned_lock(directory / "lock")
        if not (directory / f"{name}.so").exists():  # said at warning level: the embedded CLI shows no info
            log.warning("compiling the CPU decode-attention kernel for this machine, once (about 25 s): %s", directory)
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(FLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )
    except (RuntimeError, OSError, ImportError) as error:  # no compiler or ninja, a failed build
        log.warning("the CPU decode-attention kernel could not be built, decoding uses torch's attention: %s", error)
        return None
    log.info("CPU decode-attention kernel ready in %.1f s", time.perf_counter() - started)
    return module


def supports(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the kernel computes this model's decode attention (fp32 on the CPU, its shapes)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and head_dim in HEAD_DIMS
        and n_heads % n_kv == 0
        and n_heads // n_kv <= MAX_GROUP
    )
