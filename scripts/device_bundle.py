"""Carry a training job to an accelerator machine that has no network, a part at a time.

The accelerator machines lent to this project receive a copy of the repository and at most
64 MiB in all per call, and cannot download anything. Training the default adapter there
needs the base model (the 98 MB GGUF), the tokenized corpora and the `gguf` wheel (to convert
the model), so `pack` writes them as one gzipped tar cut into parts that each fit beside the
repository, with a manifest of SHA-256 digests. Each call carries one part; `stage` (run there)
checks what arrived against the manifest and keeps it in a staging folder that survives between
calls while the machine stays warm; the call that completes the set unpacks the bundle and
trains. Packing is deterministic (fixed gzip time stamp), so packing the same inputs again keeps
the parts already staged valid. Nothing here needs an accelerator: the tests run it on the CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sharedllm.common.data.corpora import write_atomic
from sharedllm.common.errors import InvalidInput
from sharedllm.common.model_loading import sha256_file

MANIFEST = "bundle.json"
FORMAT = "sharedllm-device-bundle/1"
_PART_NAME = re.compile(r"part-\d{2,}")


def _data_members(data_dir: Path) -> list[Path]:
    """The manifest, the token shards and the texts (the fallback when the tokenizer's serialisation
    differs there and the shards must be rebuilt); not the scratch files of an interrupted build."""
    if not (data_dir / "manifest.json").is_file():
        raise InvalidInput(f"{data_dir} holds no fetched corpora; run `sharedllm data fetch` first")
    members = [data_dir / "manifest.json"]
    for sub in ("shards", "texts"):
        members += sorted(p for p in (data_dir / sub).rglob("*") if p.is_file() and ".tmp" not in p.name)
    return members


def pack(model: Path, data_dir: Path, out: Path, part_mib: float, wheels: list[Path]) -> dict:
    """Write out/part-NN and out/bundle.json; returns the manifest."""
    if part_mib <= 0:
        raise InvalidInput(f"--part-mib must be positive, got {part_mib}")
    if not (model.is_file() or (model / "config.json").is_file()):
        raise InvalidInput(f"{model} is neither a model file nor a model directory with config.json")
    members = _data_members(data_dir)
    buffer = io.BytesIO()
    # mtime=0: the same inputs give the same bytes; dereference: a hub cache's files are links.
    arcname = "model.gguf" if model.is_file() else "model"
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", dereference=True) as tar,
    ):
        tar.add(model, arcname=arcname)
        for path in members:
            tar.add(path, arcname=str(Path("data") / path.relative_to(data_dir)))
        for wheel in wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    blob = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for stale in (*out.glob("part-*"), out / MANIFEST):
        stale.unlink(missing_ok=True)
    size = int(part_mib * (1 << 20))
    parts = []
    for index, start in enumerate(range(0, len(blob), size)):
        name = f"part-{index:02d}"
        piece = blob[start : start + size]
        (out / name).write_bytes(piece)
        parts.append({"name": name, "bytes": len(piece), "sha256": hashlib.sha256(piece).hexdigest()})
    manifest = {
        "format": FORMAT,
        "model": arcname,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parts": parts,
        "wheels": [w.name for w in wheels],
    }
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


@dataclass(frozen=True)
class Staged:
    """What `stage` found: the parts held so far, those still to carry, and those refused."""

    manifest: dict
    missing: list[str]
    refused: list[str]  # carried in this call but not matching the manifest (damaged, or of another packing)
    root: Path  # the unpacked bundle once nothing is missing


def _read_manifest(carried: Path) -> dict:
    path = carried / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidInput(f"{path} is missing: carry the bundle's manifest with every part") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc}); carry it again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidInput(f"{path} is not a {FORMAT} manifest")
    names = [part.get("name", "") for part in manifest.get("parts", [])]
    if not names or not all(_PART_NAME.fullmatch(name) for name in names):
        raise InvalidInput(f"{path} lists no parts, or parts not named part-NN: {names}")
    return manifest


def stage(carried: Path, stage_dir: Path) -> Staged:
    """Keep the parts carried in this call that match the manifest; unpack once all are held.

    A part whose digest does not match (a broken transfer, or a leftover of another packing) is
    refused and reported, never kept; the parts that do match are staged all the same.
    """
    manifest = _read_manifest(carried)
    held = stage_dir / manifest["sha256"][:16]
    held.mkdir(parents=True, exist_ok=True)
    refused = []
    for part in manifest["parts"]:
        source, target = carried / part["name"], held / part["name"]
        if source.is_file() and not target.is_file():
            if sha256_file(source) != part["sha256"]:
                refused.append(part["name"])
                continue
            write_atomic(target, source.read_bytes())
    missing = [p["name"] for p in manifest["parts"] if not (held / p["name"]).is_file()]
    root = held / "bundle"
    if not missing and not (root / ".complete").is_file():
        blob = b"".join((held / p["name"]).read_bytes() for p in manifest["parts"])
        if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
            raise InvalidInput("the staged parts do not add up to the manifest's bundle; carry the manifest again")
        if not hasattr(tarfile, "data_filter"):
            raise InvalidInput("unpacking needs Python >= 3.11.4 (tarfile's data filter)")
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            tar.extractall(root, filter="data")
        (root / ".complete").touch()
    return Staged(manifest, missing, refused, root)


def install_wheels(root: Path) -> Path | None:
    """Install the bundle's wheels into root/site (no index, no dependencies); returns that path."""
    wheels = sorted((root / "wheels").glob("*.whl"))
    if not wheels:
        return None
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--target",
            str(site),
            *map(str, wheels),
        ],
        check=True,
    )
    return site
