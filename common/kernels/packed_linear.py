"""The base model's linear layers with their weights laid out once for oneDNN (CPU only).

Why: on the CPU, torch's plain `F.linear` in fp32 goes to MKL, which on this project's 2-core
machines runs the products of a decode step (1 to 16 rows against a weight matrix) on one core;
a decode step is mostly streaming the weights. oneDNN with the weight reordered once ahead of
time (what torch's own compiler does for frozen CPU models) uses both cores: in two runs a pass
of 1 to 16 rows through the layers' weights took 1.2 to 2.8x less time, through the head 1.4 to
9.5x, a 600-token prompt 1.3x; a decode step of the model 1.1 to 1.3x (`bench/packed_linear.py`).
It also gives every row of a product the same bits whatever the other rows and however many
there are (1 to 4,096 rows checked, the scheduler's largest prompt piece), so an answer computed
alone, batched with others or with its prompt read in pieces goes through the same arithmetic in
every projection.

The base model is frozen (model_loading.load_model), so only the gradient with respect to the
input is needed (training the adapter back-propagates through the upper layers); it is computed
from the weight restored to its plain layout, which is exact. Only CPU models in fp32 or bf16
are packed, and only when this torch build carries oneDNN's linear; elsewhere (a GPU) the model
keeps `nn.Linear`.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

_PACKED_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN keeps a compiled product for every shape it meets, in two caches (torch's ideep and
# oneDNN's own) of 1,024 entries each by default, an entry holding up to several MB for a long
# prompt: 600 prompt lengths through the model's 4 layer shapes added 1,444 MiB, and a decoder
# that meets many prompt lengths grew round after round (tests/test_soak.py caught it). Both
# are read at their first use, so pack_linears bounds them before its first product: 67 to 88
# MiB for the same 600 lengths in three runs (`python bench/packed_linear.py`). A shape built
# again costs about 0.6 ms, once per step and weight shape (a step's 30 layers share 4); 8
# clients in process gave 72.0 and 75.1 tokens/s with 32 entries against 76.8 with 1,024
# (bench/prefill_chunk.py).
PRODUCT_CACHE_ENTRIES = "32"
PRODUCT_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linears of this device and dtype can be packed by this torch build."""
    return (
        device.type == "cpu"
        and dtype in _PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _PackedProduct(torch.autograd.Function):
    """x W^T + b with a packed W, differentiable with respect to x only (W and b are frozen)."""

    @staticmethod
    def forward(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _product(x, packed, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.packed = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # The plain weight is rebuilt for each backward rather than kept: serving never needs it,
        # and training on the CPU is the rare case that pays for it.
        return grad @ ctx.packed.to_dense(), None, None


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight oneDNN has reordered for the CPU (see the module doc)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # An opaque tensor, not a Parameter: it cannot be saved, copied or trained, only multiplied.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedProduct.apply(x, self.packed, self.bias)
        return _product(x, self.packed, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain, independent `nn.Linear` with the same weight (for copying a layer's weights)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.packed.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.packed.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def plain(linear: nn.Module) -> nn.Linear:
    """The layer as a plain `nn.Linear` that shares nothing with it: a copy to start new weights from."""
    if isinstance(linear, PackedLinear):
        return linear.to_linear()
    if isinstance(linear, nn.Linear):
        return copy.deepcopy(linear)
    raise TypeError(f"expected a linear layer, got {type(linear).__name__}")


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` under `model` by a PackedLinear; returns how many (0 where
    `available` says no). The model must be frozen and on its final device and dtype; see
    `release_file` for the memory of the weights replaced."""
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    if not linears:
        return 0
    weight = linears[0][1].weight
    if not available(weight.device, weight.dtype):
        return 0
    for variable in PRODUCT_CACHE_VARIABLES:  # before the first product (see PRODUCT_CACHE_ENTRIES); set: kept
        os.environ.setdefault(variable, PRODUCT_CACHE_ENTRIES)
    for name, module in linears:
        if module.weight.requires_grad:
            raise ValueError(f"{name} is trainable; only a frozen model's linears can be packed")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(module))
    return len(linears)


@torch.no_grad()
def release_file(model: nn.Module) -> None:
    """Copy the model's remaining parameters and buffers into memory of their own.

    Hugging Face maps a safetensors file and its weights are views of the mapping: after
    packing, the embeddings and norms still hold it, so the pages of every weight replaced stay
    resident: the default model's process, after a forward, held 1,485 MiB, against 1,079 MiB
    once the mapping goes and 988 MiB unpacked (the packed head, which the embeddings shared, is
    the difference; `python bench/packed_linear.py`).
    """
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.data = tensor.data.clone()
