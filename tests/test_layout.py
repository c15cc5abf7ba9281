"""The project's layers, checked: who may import whom, what the distribution holds, how fast
the command starts.

The rule (docs/architecture.md, "Layers"): the library `sharedllm.common` imports neither a
service nor the entry points; a service imports neither the other service nor the entry
points. Every import counts, including those inside functions, since a lazy import is still a
dependency. The check reads the source with `ast`, so it sees what the code says, not what one
run happened to import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import package -> folder, as pyproject's package-dir maps them.
FOLDERS = {
    "sharedllm.common": ROOT / "common",
    "sharedllm.compressor_service": ROOT / "compressor_service",
    "sharedllm.decoder_service": ROOT / "decoder_service",
    "sharedllm": ROOT / "sharedllm",
}
ENTRY = "sharedllm"  # the package itself, and everything in it that is not one of the folders above
FORBIDDEN = {
    "sharedllm.common": ("sharedllm.compressor_service", "sharedllm.decoder_service", ENTRY),
    "sharedllm.compressor_service": ("sharedllm.decoder_service", ENTRY),
    "sharedllm.decoder_service": ("sharedllm.compressor_service", ENTRY),
}


def layer_of(module: str) -> str:
    """The layer a module belongs to: the longest FOLDERS key that names it or its package."""
    return max((p for p in FOLDERS if module == p or module.startswith(p + ".")), key=len, default="")


def module_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def python_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.py") if "generated" not in p.parts]


def violations() -> list[str]:
    found = []
    for package, forbidden in FORBIDDEN.items():
        for path in python_files(FOLDERS[package]):
            for line, module in module_imports(path):
                target = layer_of(module)
                bare = module.split(".")[0] in ("common", "compressor_service", "decoder_service")
                if target in forbidden or bare:
                    found.append(f"{path.relative_to(FOLDERS[package].parent)}:{line} imports {module}")
    return found


def test_the_library_imports_no_service_and_no_entry_point():
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The rule bites: a function-level import of a service from the library is reported."""
    library = tmp_path / "common"
    library.mkdir()
    (library / "bad.py").write_text("def f():\n    from sharedllm.decoder_service.servicer import X\n")
    (library / "good.py").write_text("from sharedllm.common.errors import InvalidInput\n")
    monkeypatch.setitem(FOLDERS, "sharedllm.common", library)
    assert violations() == ["common/bad.py:2 imports sharedllm.decoder_service.servicer"]


def test_every_package_folder_is_in_the_distribution():
    """pyproject lists packages by hand (package-dir maps folders); a new folder must be listed."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = set()
    for package, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            on_disk.add(".".join((package, *relative)))
    assert on_disk == listed


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")


def test_help_starts_in_under_a_second():
    run_python("import sharedllm.cli")  # warm the file cache: the bound is for a command, not a cold disk
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sharedllm", "--help"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0 and "generate" in done.stdout
    assert elapsed < 1.0, f"`sharedllm --help` took {elapsed:.2f} s"


@pytest.mark.parametrize("command", ["--help", "generate", "compress", "data", "batch", "health"])
def test_light_commands_do_not_load_torch(command):
    """The clients and `data` parse (and show their help) without torch or transformers."""
    argv = [command, "--help"] if command != "--help" else ["--help"]
    done = run_python(
        "import sys\n"
        "from sharedllm.cli import build_parser\n"
        "try:\n"
        f"    build_parser({argv!r}).parse_args({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
