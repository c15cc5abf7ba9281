"""Run on the accelerator machine: stage the carried bundle part; once all are held, train.

    python3 scripts/device_train.py [--bundle-dir .device] [--stage .device-stage] -- TRAIN-ARGS

TRAIN-ARGS go to `python -m sharedllm train` (model, data and run directory are the
bundle's). The adapter, its sidecar and the loss log are written to $OUT (or --out). Uses only
the standard library and what training needs, which that machine has (plus the bundle's wheels).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_bundle import install_wheels, stage  # noqa: E402

from sharedllm.common.errors import SharedLLMError  # noqa: E402

# Where the model, data and outputs are is this script's business: the bundle's, and $OUT.
RESERVED = ("--model", "--data-dir", "--run-dir", "--out")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle-dir", type=Path, default=REPO / ".device")
    # An ignored folder of the repository copy: the device tool keeps those while the machine is warm.
    parser.add_argument("--stage", type=Path, default=REPO / ".device-stage")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if "OUT" in os.environ else None)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.out is None:
        parser.error("--out is required where $OUT is unset")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    reserved = [a for a in train_args if a.split("=")[0] in RESERVED]
    if reserved:
        parser.error(f"the bundle sets {', '.join(RESERVED)}; drop {' '.join(reserved)} from TRAIN-ARGS")
    try:
        staged = stage(args.bundle_dir, args.stage)
    except SharedLLMError as exc:
        print(f"device_train: error: {exc}", file=sys.stderr)
        return 2
    if staged.refused:
        print(f"refused (damaged, or of another packing; carry again): {' '.join(staged.refused)}", file=sys.stderr)
    if staged.missing:
        held = len(staged.manifest["parts"]) - len(staged.missing)
        print(f"staged {held} of {len(staged.manifest['parts'])} parts; still to carry: {' '.join(staged.missing)}")
        return 2 if staged.refused else 0
    root = staged.root
    site = install_wheels(root)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(p) for p in (site, REPO) if p is not None),
        "SHAREDLLM_CACHE_DIR": str(args.stage / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    run_dir = args.stage / "run"  # kept while the machine is warm: a rerun resumes its checkpoint
    command = [
        sys.executable,
        "-m",
        "sharedllm",
        "train",
        "--model",
        str(root / staged.manifest["model"]),
        "--data-dir",
        str(root / "data"),
        "--run-dir",
        str(run_dir),
        "--out",
        str(args.out / "adapter.safetensors"),
        *train_args,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, env=env, cwd=REPO).returncode
    if (run_dir / "log.jsonl").is_file():
        shutil.copyfile(run_dir / "log.jsonl", args.out / "log.jsonl")
    return code


if __name__ == "__main__":
    sys.exit(main())
