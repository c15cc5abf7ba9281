"""The engine's own layer loop over a Hugging Face Llama-family model.

Only the stable parts of the upstream modules are used (embeddings, `layers[i].self_attn.
{q,k,v,o}_proj`, the norms, the MLP, the rotary embedding, `lm_head`), so changes to the
upstream `forward` or cache classes cannot break the engine. The lower model (compressor)
and the upper model (decoder) are two views of the *same* modules: nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from sharedllm.common.kernels.reference import rotate_half

# Called after self-attention of layer i with the residual stream; returns what to add.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor | None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, L, Dh] by per-position tables [B, L, Dh]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def rms_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each vector to unit RMS; retrieval keys and queries share this normalisation."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class KVCache:
    """Preallocated keys/values of the prompt and generated tokens, one slab per layer."""

    def __init__(self, n_layers: int, batch: int, n_kv: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (n_layers, batch, n_kv, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


@dataclass(frozen=True)
class LayerOutput:
    """Keys (after RoPE) and values a layer produced for its input tokens: [B, n_kv, L, Dh]."""

    keys: torch.Tensor
    values: torch.Tensor


class LlamaBody:
    """A plain forward over a Llama-family model's modules, with hooks for injection."""

    def __init__(self, hf_model: PreTrainedModel) -> None:
        self.hf = hf_model
        inner = hf_model.model
        self.embed: nn.Embedding = inner.embed_tokens
        self.layers: nn.ModuleList = inner.layers
        self.norm: nn.Module = inner.norm
        self.rotary: nn.Module = inner.rotary_emb
        self.lm_head: nn.Linear = hf_model.lm_head
        cfg = hf_model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.window = cfg.max_position_embeddings
        self.rms_eps = cfg.rms_norm_eps

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [B, L, Dh] for integer positions [B, L], from the model's own RoPE."""
        probe = self.embed.weight[:1]
        return self.rotary(probe, positions)

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        return KVCache(self.n_layers, batch, self.n_kv, self.head_dim, capacity, self.dtype, self.device)

    def project(self, index: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, heads, L, Dh] of layer `index` for h [B, L, hidden], before RoPE."""
        layer = self.layers[index]
        attn = layer.self_attn
        b, length, _ = h.shape
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int) -> torch.Tensor:
        """Causal attention of queries q [B, H, L, Dh] sitting after `past` cached entries, then o_proj."""
        b, _, length, _ = q.shape
        out = self.attention_heads(index, q, keys, values, past)
        return self.layers[index].self_attn.o_proj(out.transpose(1, 2).reshape(b, length, -1))

    def attention_heads(
        self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int
    ) -> torch.Tensor:
        """The heads' outputs [B, H, L, Dh] of causal attention, before o_proj (a batched decode
        step attends row by row, each over its own cache, and projects all rows at once)."""
        length = q.shape[2]
        mask = None
        if past > 0 and length > 1:
            # Query i sits at position past + i and may see keys 0..past + i.
            mask = torch.ones(length, past + length, dtype=torch.bool, device=q.device).tril(past)
        return F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=past == 0 and length > 1,
            scale=self.layers[index].self_attn.scaling,
            enable_gqa=self.n_heads != self.n_kv,
        )

    def attention(
        self,
        index: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, LayerOutput]:
        """Causal self-attention of layer `index` over h [B, L, hidden] (plus the cache)."""
        q, k, v = self.project(index, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0 if cache is None else cache.length
        k_all, v_all = (k, v) if cache is None else cache.update(index, k, v)
        return self.attend(index, q, k_all, v_all, past), LayerOutput(k, v)

    def mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        return layer.mlp(layer.post_attention_layernorm(h))

    def forward_layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        layers: range,
        cache: KVCache | None = None,
        hook: LayerHook | None = None,
        record: list[LayerOutput] | None = None,
    ) -> torch.Tensor:
        """Run layers over the residual stream h [B, L, hidden] at integer positions [B, L].

        `hook(i, h)` runs between self-attention and the MLP of layer i (the injection point);
        `record` collects each layer's keys/values (what the compressor keeps).
        """
        cos, sin = self.rope(positions)
        for i in layers:
            out, kv = self.attention(i, h, cos, sin, cache)
            h = h + out
            if record is not None:
                record.append(kv)
            if hook is not None:
                extra = hook(i, h)
                if extra is not None:
                    h = h + extra
            h = h + self.mlp(i, h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))
