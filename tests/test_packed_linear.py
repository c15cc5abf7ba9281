"""The CPU's packed linears (kernels/packed_linear.py): the same products, rows independent to
the bit, gradients for training, and the model loader packing only what it may."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharedllm.common.kernels.packed_linear import PackedLinear, available, pack_linears, plain

pytestmark = pytest.mark.skipif(
    not available(torch.device("cpu"), torch.float32), reason="this torch build has no oneDNN linear"
)


def frozen(n_in: int, n_out: int, bias: bool = False, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype).requires_grad_(False)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_packed_linear_computes_the_linear(dtype, tolerance):
    linear = frozen(96, 160, bias=True, dtype=dtype)
    x = torch.randn(2, 7, 96, dtype=dtype)
    assert torch.allclose(PackedLinear(linear)(x).float(), linear(x).float(), atol=tolerance, rtol=tolerance)


def test_a_row_gets_the_same_bits_however_many_rows_share_the_product():
    packed = PackedLinear(frozen(576, 1536))
    x = torch.randn(600, 576)
    alone = torch.cat([packed(x[i : i + 1]) for i in range(0, 600, 37)])
    for rows in (2, 3, 5, 8, 16, 64, 600):
        together = packed(x[:rows])
        assert torch.equal(together[::37], alone[: len(together[::37])]), rows


def test_the_gradient_reaches_the_input_through_a_packed_linear():
    linear = frozen(32, 48)
    x = torch.randn(5, 32, requires_grad=True)
    (PackedLinear(linear)(x) ** 2).sum().backward()
    expected = x.detach().clone().requires_grad_(True)
    (linear(expected) ** 2).sum().backward()
    assert torch.allclose(x.grad, expected.grad, atol=1e-5)


def test_plain_gives_an_independent_trainable_copy():
    linear = frozen(16, 24, bias=True)
    copy = plain(PackedLinear(linear))
    assert type(copy) is nn.Linear and torch.equal(copy.weight, linear.weight) and torch.equal(copy.bias, linear.bias)
    copy.weight.data.zero_()
    assert linear.weight.abs().sum() > 0


def test_pack_linears_replaces_frozen_linears_and_refuses_trainable_ones():
    model = nn.Sequential(frozen(8, 8), nn.ReLU(), nn.Sequential(frozen(8, 4)))
    x = torch.randn(3, 8)
    before = model(x)
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert torch.allclose(model(x), before, atol=1e-6)
    with pytest.raises(ValueError, match="trainable"):
        pack_linears(nn.Sequential(nn.Linear(4, 4)))


def test_only_cpu_float_models_are_packed():
    assert not available(torch.device("cuda"), torch.float32)
    assert not available(torch.device("cpu"), torch.float16)


def test_the_loader_packs_the_model_and_its_lower_half_without_the_head(tiny_model_dir):
    from sharedllm.common.model_loading import load_model

    whole = load_model(str(tiny_model_dir), device="cpu").model
    assert isinstance(whole.model.layers[0].mlp.down_proj, PackedLinear) and isinstance(whole.lm_head, PackedLinear)
    lower = load_model(str(tiny_model_dir), device="cpu", lower_layers=1).model
    assert isinstance(lower.model.layers[0].self_attn.q_proj, PackedLinear)
    assert type(lower.lm_head) is nn.Linear  # a compressor never reads the head
