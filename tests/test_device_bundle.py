"""The accelerator route for training, run on the CPU: pack the job into parts, carry them one
call at a time, stage them, and train once the set is complete, writing the adapter to $OUT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sharedllm.common.data.corpora import fetch
from sharedllm.common.engine.engine import Engine
from sharedllm.common.errors import InvalidInput

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # development tooling, not part of the package

from device_bundle import MANIFEST, pack, stage  # noqa: E402

TRAIN = [
    "--device",
    "cpu",
    "--corpora",
    "bible",
    "--layers",
    "2",
    "--chunk-size",
    "64",
    "--depth",
    "2",
    "--pool-size",
    "4",
    "--context-chunks",
    "2",
    "--decoder-tokens",
    "32",
    "--eval-examples",
    "1",
    "--steps",
    "2",
]


@pytest.fixture(scope="module")
def packed(tiny_model_dir, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    fetch(data, corpora=("bible",))
    out = tmp_path_factory.mktemp("bundle")
    manifest = pack(tiny_model_dir, data, out, part_mib=4, wheels=[])
    assert len(manifest["parts"]) >= 2 and all(p["bytes"] <= 4 << 20 for p in manifest["parts"])
    return out


def carry(packed: Path, target: Path, *parts: str) -> Path:
    """What one device call receives: the manifest and the named parts."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, *parts):
        shutil.copyfile(packed / name, target / name)
    return target


def test_parts_staged_over_several_calls_train_on_the_last(packed, tiny_model_dir, tmp_path):
    names = [p["name"] for p in json.loads((packed / MANIFEST).read_text())["parts"]]
    staging = tmp_path / "stage"
    first = stage(carry(packed, tmp_path / "call-1", names[0]), staging)
    assert first.missing == names[1:]
    out = tmp_path / "out"
    script = [sys.executable, str(REPO / "scripts" / "device_train.py"), "--stage", str(staging)]
    last = carry(packed, tmp_path / "call-2", *names[1:])
    result = subprocess.run(
        [*script, "--bundle-dir", str(last), "--", *TRAIN],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    provenance = json.loads((out / "adapter.safetensors.json").read_text())["provenance"]
    assert provenance["steps"] == 2 and provenance["corpora"] == ["bible"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()][-1] == 2
    engine = Engine.load(str(tiny_model_dir), adapter=out / "adapter.safetensors", device="cpu")
    assert engine.trained  # trained against the same base model: the fingerprints agree


def test_a_damaged_part_is_refused_and_the_good_ones_still_staged(packed, tmp_path):
    names = [p["name"] for p in json.loads((packed / MANIFEST).read_text())["parts"]]
    carried = carry(packed, tmp_path / "call", *names[:2])
    with open(carried / names[0], "r+b") as handle:  # one flipped bit, as a broken transfer leaves it
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    staged = stage(carried, tmp_path / "stage")
    assert staged.refused == [names[0]] and names[0] in staged.missing and names[1] not in staged.missing
    assert not any((tmp_path / "stage").rglob(names[0]))
    staged = stage(carry(packed, tmp_path / "again", names[0], *names[2:]), tmp_path / "stage")
    assert staged.missing == [] and staged.refused == [] and (staged.root / "data" / "manifest.json").is_file()


def test_packing_the_same_files_again_gives_the_same_parts(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    fetch(data, corpora=("bible",))
    first = pack(tiny_model_dir, data, tmp_path / "one", part_mib=4, wheels=[])
    assert pack(tiny_model_dir, data, tmp_path / "two", part_mib=4, wheels=[]) == first  # staged parts stay valid


def test_bad_calls_say_what_is_wrong(packed, tiny_model_dir, tmp_path):
    with pytest.raises(InvalidInput, match="sharedllm data fetch"):
        pack(tiny_model_dir, tmp_path / "no-data", tmp_path / "out", part_mib=4, wheels=[])
    with pytest.raises(InvalidInput, match="carry the bundle's manifest"):
        stage(tmp_path, tmp_path / "stage")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        stage(tmp_path, tmp_path / "stage")
    script = [sys.executable, str(REPO / "scripts" / "device_train.py"), "--bundle-dir", str(packed)]
    result = subprocess.run(
        [*script, "--out", str(tmp_path), "--", "--steps", "1", "--run-dir", "elsewhere"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "drop --run-dir" in result.stderr
