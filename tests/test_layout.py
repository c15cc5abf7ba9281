"""The project's layers, checked: who may import whom, what the distribution holds, how fast
the command starts.

The rules (docs/architecture.md, "Layers"): the library `sharedllm.common` imports neither a
service nor the entry points; a service imports neither the other service nor the entry
points. The library is a library: it parses no command line and starts no process (applications
such as the benchmark harness live with the entry points), reads no environment variable at
import (a Celery app or a setting is built from explicit values, in a function), and its
modules form no import cycle, not even through an import inside a function. Every import
counts, including those inside functions, since a lazy import is still a dependency. The checks
read the source with `ast`, so they see what the code says, not what one run happened to import.
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


# Modules an application uses and a library has no business with.
APPLICATION_MODULES = ("argparse", "subprocess")


def library_modules(folder: Path | None = None) -> dict[str, Path]:
    """Module name -> file, for every module of the library."""
    folder = folder or FOLDERS["sharedllm.common"]
    found = {}
    for path in python_files(folder):
        parts = path.relative_to(folder).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        found[".".join(("sharedllm.common", *parts))] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the library modules it imports (`from package import module` names the module)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]  # fmt: skip
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            if component:
                found.append(sorted([node, *component]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_time_environment_reads(path: Path) -> list[int]:
    """Lines that read os.environ / os.getenv outside any function: run at import."""
    lines = []

    def walk(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            walk(child)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return lines


def test_the_library_parses_no_command_line_and_starts_no_process():
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in library_modules().values()
        for line, module in module_imports(path)
        if module in APPLICATION_MODULES
    ]
    assert found == []


def test_the_library_reads_no_environment_at_import():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in library_modules().values()
        for line in import_time_environment_reads(path)
    ]
    assert found == []


def test_the_library_has_no_import_cycles():
    assert cycles(import_graph(library_modules())) == []


def test_the_cycle_and_environment_checks_bite(tmp_path):
    """A cycle through a function-level import is found, and so is an environment read at import."""
    library = tmp_path / "common"
    (library / "store").mkdir(parents=True)
    (library / "store" / "__init__.py").write_text("")
    (library / "store" / "base.py").write_text("from sharedllm.common.store.quota import Quota\n")
    (library / "store" / "quota.py").write_text("def f():\n    from sharedllm.common.store import base\n")
    (library / "app.py").write_text("import os\nURL = os.environ.get('X')\ndef f():\n    return os.environ\n")
    assert cycles(import_graph(library_modules(library))) == [
        ["sharedllm.common.store.base", "sharedllm.common.store.quota"]
    ]
    assert import_time_environment_reads(library / "app.py") == [2]


def test_the_bench_scripts_run_on_the_installed_package():
    """bench/*.py import the project as installed (`make setup` installs it editable), never by
    editing sys.path."""
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


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
