"""RTN quantization, the QuantizedWeight record, and the (out, in) weight accessors."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from quantkit.errors import QuantkitError
from quantkit.quant.qdq import compute_qparams, dequantize, fake_quantize, quantize
from quantkit.quant.rtn import (
    QuantizedWeight,
    default_g_idx,
    rtn_quantize,
    rtn_quantize_modules,
)
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import set_weight_out_in, weight_out_in


def _weight(out_features=48, in_features=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * 0.05


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_record_shapes_and_values(group_size, symmetric):
    w = _weight()
    scheme = QuantScheme(bits=4, group_size=group_size, symmetric=symmetric)
    qw = rtn_quantize(w, scheme)
    n_groups = 1 if group_size == -1 else 128 // group_size
    assert qw.codes.shape == (48, 128) and qw.codes.dtype == torch.int32
    assert qw.scales.shape == (48, n_groups) and qw.scales.dtype == torch.float32
    assert qw.zeros.shape == (48, n_groups) and qw.zeros.dtype == torch.int32
    assert torch.equal(qw.g_idx, default_g_idx(128, group_size))
    assert (qw.bits, qw.group_size, qw.symmetric) == (4, group_size, symmetric)
    assert int(qw.zeros.min()) >= 1
    assert torch.equal(qw.dequantize(), fake_quantize(w, scheme))
    assert torch.equal(
        qw.dequantize(), dequantize(qw.codes, qw.scales, qw.zeros, group_size)
    )


def test_default_g_idx():
    assert default_g_idx(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert default_g_idx(5, -1).tolist() == [0] * 5
    assert default_g_idx(4, 2).dtype == torch.int32


def test_rtn_without_min_zero_or_fp16_matches_the_raw_math():
    w = _weight(seed=1).abs()  # all positive: the free asymmetric zero point is 0
    qw = rtn_quantize(
        w, QuantScheme(group_size=32, symmetric=False), min_zero=0, fp16_scales=False
    )
    scales, zeros = compute_qparams(w, 4, 32, False)
    assert torch.equal(qw.scales, scales) and torch.equal(qw.zeros, zeros)
    assert torch.equal(qw.codes, quantize(w, scales, zeros, 4, 32))
    assert int(qw.zeros.min()) == 0


def test_dequantize_follows_a_permuted_g_idx():
    qw = QuantizedWeight(
        codes=torch.tensor([[0, 1, 2, 3]], dtype=torch.int32),
        scales=torch.tensor([[0.5, 2.0]]),
        zeros=torch.tensor([[1, 2]], dtype=torch.int32),
        g_idx=torch.tensor([1, 0, 1, 0], dtype=torch.int32),
        bits=2, group_size=2, symmetric=False,
    )  # fmt: skip
    # column i uses group g_idx[i]: 2*(0-2), 0.5*(1-1), 2*(2-2), 0.5*(3-1)
    assert qw.dequantize().tolist() == [[-4.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.01), (4, 0.15), (3, 0.3), (2, 0.7)])
def test_rtn_relative_error_shrinks_with_bits(bits, bound):
    w = _weight(64, 256, seed=2)
    qw = rtn_quantize(w, QuantScheme(bits=bits, group_size=64, symmetric=False))
    assert (qw.dequantize() - w).norm() / w.norm() < bound


def test_rtn_reports_the_layer_whose_group_size_does_not_divide():
    with pytest.raises(
        QuantkitError, match="input size 100 of layer 'model.layers.0.mlp.down_proj'"
    ):
        rtn_quantize(
            torch.zeros(8, 100),
            QuantScheme(group_size=64),
            module_name="model.layers.0.mlp.down_proj",
        )


def test_weight_accessors_handle_linear_and_conv1d():
    linear = nn.Linear(6, 4)
    conv = Conv1D(4, 6)  # nf=4 outputs, nx=6 inputs; weight stored (6, 4)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
    assert torch.equal(weight_out_in(linear), linear.weight)
    assert torch.equal(weight_out_in(conv), linear.weight)
    new = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    set_weight_out_in(linear, new)
    set_weight_out_in(conv, new)
    assert torch.equal(linear.weight, new) and torch.equal(conv.weight, new.t())
    x = torch.randn(3, 6)
    assert torch.allclose(conv(x), linear(x) - linear.bias + conv.bias)


def test_weight_accessors_reject_other_layers():
    with pytest.raises(
        QuantkitError, match="cannot handle the weight of a Embedding layer"
    ):
        weight_out_in(nn.Embedding(4, 4))
    with pytest.raises(QuantkitError, match="Embedding"):
        set_weight_out_in(nn.Embedding(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="does not match"):
        set_weight_out_in(nn.Linear(6, 4), torch.zeros(6, 4))


def test_conv1d_is_quantized_in_out_in_orientation():
    linear = nn.Linear(64, 32, bias=False)
    conv = Conv1D(32, 64)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
    scheme = QuantScheme(group_size=32)
    from_linear = rtn_quantize(weight_out_in(linear), scheme)
    from_conv = rtn_quantize(weight_out_in(conv), scheme)
    assert torch.equal(from_linear.codes, from_conv.codes)
    assert torch.equal(from_linear.scales, from_conv.scales)


def test_rtn_quantize_modules_skips_ignored_layers():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    scheme = QuantScheme(group_size=32, ignore=("lm_head", "re:.*\\.1\\.mlp"))
    quantized = rtn_quantize_modules(modules, scheme)
    assert "lm_head" not in quantized
    assert "model.layers.1.mlp.up_proj" not in quantized
    assert "model.layers.0.mlp.up_proj" in quantized
    assert len(quantized) == 7 + 4
    down = quantized["model.layers.0.mlp.down_proj"]
    assert down.codes.shape == (64, 256)
    assert torch.equal(
        down.dequantize(),
        fake_quantize(model.model.layers[0].mlp.down_proj.weight.detach(), scheme),
    )
