"""Pack a training job for an accelerator machine without network: base model, corpora, wheels.

    python scripts/device_pack.py [--out .device] [--part-mib 44]

writes .device/part-NN and .device/bundle.json, then prints one device call per part (see
docs/training.md, "Training on a GPU machine without network"). Run `sharedllm data fetch` first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_bundle import MANIFEST, pack

from sharedllm.common.errors import SharedLLMError
from sharedllm.common.model_loading import default_gguf_path

# What training needs there beyond the machine's own packages (torch, transformers, numpy, ...).
WHEELS = ("gguf",)


def download_wheels(directory: Path) -> list[Path]:
    """This environment's versions of WHEELS, as wheels (pure Python: any platform)."""
    try:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemExit(f"device_pack: error: {exc.name} is not installed here; run `make setup` first") from exc
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(directory),
            *pins,
        ],
        check=True,
    )
    return sorted(directory.glob("*.whl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a .gguf file or a model directory (default: the default model)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path(".device"))
    parser.add_argument("--part-mib", type=float, default=44, help="the repository travels beside each part")
    parser.add_argument("--no-wheels", action="store_true", help="the machine already has " + ", ".join(WHEELS))
    args = parser.parse_args()
    try:
        model = args.model or default_gguf_path()
        with tempfile.TemporaryDirectory() as scratch:
            wheels = [] if args.no_wheels else download_wheels(Path(scratch))
            manifest = pack(model, args.data_dir, args.out, args.part_mib, wheels)
    except SharedLLMError as exc:
        print(f"device_pack: error: {exc}", file=sys.stderr)
        return 2
    print(f"packed {manifest['bytes'] / (1 << 20):.1f} MiB in {len(manifest['parts'])} parts under {args.out}/")
    print("one device call per part, each within 30 s of the last (the machine must stay warm):")
    for part in manifest["parts"]:
        print(f"  carry {args.out}/{MANIFEST} {args.out}/{part['name']}: python3 scripts/device_train.py -- TRAIN-ARGS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
