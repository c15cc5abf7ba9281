"""The injection adapter: one cross-attention block per bottom layer, plus its config.

Initialisation follows docs/method.md §4: the RMSNorm and `q_proj` are copied from the layer's
self-attention and `o_proj` is zero, so an untrained adapter leaves the base model's output
exactly unchanged. Saved as safetensors with a JSON sidecar recording the tree config, the
base model's fingerprint and how the adapter was trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sharedllm.common.config import TreeConfig
from sharedllm.common.engine.llama import LlamaBody, apply_rope
from sharedllm.common.errors import InvalidInput, ModelUnavailable
from sharedllm.common.kernels.packed_linear import plain

ADAPTER_FORMAT = "sharedllm-adapter/1"


class CrossAttention(nn.Module):
    """Attention from the decoder's residual stream to the selected context entries.

    No new key/value projections: the keys and values are those the same layer of the lower
    model produced. Grouped-query heads are shared as in the base self-attention.
    """

    def __init__(self, norm: nn.Module, q_proj: nn.Linear, o_proj: nn.Linear, head_dim: int, scaling: float):
        super().__init__()
        self.norm = norm
        self.q_proj = q_proj
        self.o_proj = o_proj
        self.head_dim = head_dim
        self.scaling = scaling

    def forward(
        self,
        h: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """h [B, L, hidden]; keys/values [B, n_kv, E, Dh]; mask [E]; rope: query tables [B, L, Dh]."""
        b, length, _ = h.shape
        q = self.q_proj(self.norm(h)).view(b, length, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope)
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask.view(1, 1, 1, -1),
            scale=self.scaling,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class InjectionAdapter(nn.Module):
    """Cross-attention blocks for layers 0..M-1 and the tree config they were trained with."""

    def __init__(self, config: TreeConfig, blocks: list[CrossAttention], provenance: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(blocks)
        self.provenance = dict(provenance or {})
        self.base_fingerprint = ""
        self.recorded_fingerprint = ""  # set by `load` from the sidecar and by `save`

    @classmethod
    def initialise(cls, body: LlamaBody, config: TreeConfig) -> InjectionAdapter:
        """Fresh adapter for `body`: norm and q_proj copied, o_proj zero (output unchanged)."""
        if config.n_layers > body.n_layers:
            raise ValueError(f"n_layers={config.n_layers} exceeds the model's {body.n_layers} layers")
        blocks = []
        for i in range(config.n_layers):
            layer = body.layers[i]
            attn = layer.self_attn
            o_proj = plain(attn.o_proj)
            nn.init.zeros_(o_proj.weight)
            if o_proj.bias is not None:
                nn.init.zeros_(o_proj.bias)
            block = CrossAttention(
                copy.deepcopy(layer.input_layernorm), plain(attn.q_proj), o_proj, body.head_dim, attn.scaling
            )
            blocks.append(block)
        adapter = cls(config, blocks, {"trained": False})
        adapter.to(device=body.device, dtype=body.dtype)
        adapter.requires_grad_(False)
        return adapter

    def retargeted(self, config: TreeConfig) -> InjectionAdapter:
        """These weights read trees built with `config`: a starting point for fine-tuning.

        The weights depend on M alone (one block per injected layer), so C, D, P, the encoding,
        the pooling and the positions can change; the result is untrained for `config` and gets
        a fresh fingerprint, since contexts built for this adapter's config do not fit it. It
        shares this adapter's modules rather than copying them (training only ever needs one of
        the two), so training it changes this one too; read this one's fingerprint first.
        """
        if config.n_layers != self.config.n_layers:
            raise InvalidInput(
                f"an adapter that injects into {self.config.n_layers} layers cannot read trees of "
                f"M={config.n_layers}; the weights fit only the same M"
            )
        adapter = type(self)(config, list(self.blocks), {"trained": False})
        adapter.base_fingerprint = self.base_fingerprint
        return adapter

    def fingerprint(self) -> str:
        """Identity of the adapter; contexts record it so a decoder never reads a tree built
        for other injection weights.

        A loaded adapter keeps the fingerprint its sidecar recorded at save time, so a compressor
        in fp32 on a CPU and a decoder in bf16 on a GPU agree. Otherwise it is a content hash of
        the parameters rounded to bf16, which is the same for the fp32 and bf16 copies.
        """
        if self.recorded_fingerprint:
            return self.recorded_fingerprint
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.bfloat16).view(torch.int16).contiguous().numpy().tobytes())
        return f"adapter-sha256:{digest.hexdigest()[:32]}"

    def save(self, path: Path, base_fingerprint: str) -> None:
        """Write `path` (safetensors) and `path.json` (sidecar)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path))
        self.recorded_fingerprint = ""
        self.recorded_fingerprint = self.fingerprint()
        sidecar = {
            "format": ADAPTER_FORMAT,
            "tree_config": self.config.to_dict(),
            "base_model_fingerprint": base_fingerprint,
            "adapter_fingerprint": self.fingerprint(),
            "provenance": self.provenance,
        }
        sidecar_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path, body: LlamaBody, base_fingerprint: str) -> InjectionAdapter:
        """Load onto `body`; refuses an adapter trained for another base model."""
        path = Path(path)
        meta = read_sidecar(path)
        if meta.get("base_model_fingerprint") != base_fingerprint:
            raise ModelUnavailable(
                f"adapter {path} was trained for base model {meta.get('base_model_fingerprint')!r}, "
                f"but the loaded model is {base_fingerprint!r}"
            )
        adapter = cls.initialise(body, TreeConfig.from_dict(meta["tree_config"]))
        state = load_file(str(path))
        missing, unexpected = adapter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelUnavailable(f"adapter {path} does not fit the model: missing {missing}, unexpected {unexpected}")
        adapter.to(device=body.device, dtype=body.dtype)
        adapter.provenance = dict(meta.get("provenance", {}))
        adapter.base_fingerprint = base_fingerprint
        adapter.recorded_fingerprint = str(meta.get("adapter_fingerprint") or "")
        return adapter


def sidecar_path(path: Path) -> Path:
    return Path(str(path) + ".json")


def read_sidecar(path: Path) -> dict[str, Any]:
    """The adapter's JSON sidecar, validated enough to trust its format and config."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        raise ModelUnavailable(f"adapter {path} or its sidecar {side.name} is missing")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"adapter sidecar {side} is not valid JSON: {exc}") from exc
    if meta.get("format") != ADAPTER_FORMAT:
        raise ModelUnavailable(f"adapter {path} has format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    return meta


def read_adapter_config(path: Path) -> TreeConfig:
    """The tree config an adapter was trained with (read before the model is loaded)."""
    return TreeConfig.from_dict(read_sidecar(path)["tree_config"])
