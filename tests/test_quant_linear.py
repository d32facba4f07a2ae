"""QuantLinear: GPTQ-layout buffers and a forward equal to the fake-quantized float layer."""

import pytest
import torch
import torch.nn.functional as F

from quantkit.quant.awq_linear import AwqLinear
from quantkit.quant.dequant_linear import DequantLinear
from quantkit.quant.linear import QuantLinear
from quantkit.quant.pack_quantized_linear import PackQuantizedLinear
from quantkit.quant.packing import unpack_cols, unpack_rows
from quantkit.quant.rtn import QuantizedWeight, rtn_quantize
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import weight_out_in

IN, OUT = 256, 96


def _layer_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=generator) * 0.05
    bias = torch.randn(OUT, generator=generator) * 0.1
    x = torch.randn(2, 5, IN, generator=generator)
    return weight, bias, x


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_forward_matches_fake_quantized_linear(bits, symmetric, group_size):
    weight, bias, x = _layer_inputs(seed=bits * 10 + group_size)
    qw = rtn_quantize(
        weight, QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    )
    layer = QuantLinear.from_quantized(qw, bias)
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())
    expected = F.linear(x, qw.dequantize(), bias.half().float())
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (3, 32), (8, -1), (2, 64)])
def test_buffers_follow_the_gptq_layout(bits, group_size):
    weight, bias, _ = _layer_inputs(seed=1)
    qw = rtn_quantize(
        weight, QuantScheme(bits=bits, group_size=group_size, symmetric=False)
    )
    layer = QuantLinear.from_quantized(qw, bias)
    n_groups = 1 if group_size == -1 else IN // group_size
    assert (
        layer.qweight.shape == (IN * bits // 32, OUT)
        and layer.qweight.dtype == torch.int32
    )
    assert (
        layer.qzeros.shape == (n_groups, OUT * bits // 32)
        and layer.qzeros.dtype == torch.int32
    )
    assert layer.scales.shape == (n_groups, OUT) and layer.scales.dtype == torch.float16
    assert layer.g_idx.shape == (IN,) and layer.g_idx.dtype == torch.int32
    assert layer.bias.dtype == torch.float16
    assert torch.equal(unpack_rows(layer.qweight, bits), qw.codes.t())
    assert torch.equal(
        unpack_cols(layer.qzeros, bits), qw.zeros.t() - 1
    )  # v1 stores zero - 1
    assert torch.equal(layer.scales.float(), qw.scales.t())
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


def test_no_bias_and_half_precision_inputs():
    weight, _, x = _layer_inputs(seed=2)
    qw = rtn_quantize(weight, QuantScheme(bits=4, group_size=64))
    layer = QuantLinear.from_quantized(qw)
    assert layer.bias is None and "bias" not in layer.state_dict()
    for dtype in (torch.bfloat16, torch.float16):
        out = layer(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(
            out.float(), F.linear(x, qw.dequantize()), rtol=0.02, atol=0.02
        )


def test_cached_weight_refreshes_after_loading_new_buffers():
    weight, bias, x = _layer_inputs(seed=3)
    scheme = QuantScheme(bits=4, group_size=32)
    layer = QuantLinear.from_quantized(rtn_quantize(weight, scheme), bias)
    first = layer(x)
    assert torch.equal(layer(x), first)
    other = rtn_quantize(weight * -2, scheme)
    layer.load_state_dict(QuantLinear.from_quantized(other, bias).state_dict())
    torch.testing.assert_close(
        layer(x),
        F.linear(x, other.dequantize(), bias.half().float()),
        rtol=1e-6,
        atol=1e-6,
    )


def test_permuted_g_idx_is_honoured():
    weight, _, _ = _layer_inputs(seed=4)
    qw = rtn_quantize(weight, QuantScheme(bits=4, group_size=64))
    permutation = torch.randperm(IN, generator=torch.Generator().manual_seed(0))
    shuffled = QuantizedWeight(
        codes=qw.codes, scales=qw.scales, zeros=qw.zeros, g_idx=qw.g_idx[permutation],
        bits=4, group_size=64, symmetric=True,
    )  # fmt: skip
    layer = QuantLinear.from_quantized(shuffled)
    assert torch.equal(layer.dequantize_weight(), shuffled.dequantize())
    assert not torch.equal(shuffled.dequantize(), qw.dequantize())


@pytest.mark.parametrize(
    ("layer_class", "bits"), [(QuantLinear, 3), (AwqLinear, 4), (PackQuantizedLinear, 3)]
)
def test_weight_out_in_of_a_packed_layer_is_its_dequantized_weight(layer_class, bits):
    weight, _, _ = _layer_inputs(seed=5)
    qw = rtn_quantize(weight, QuantScheme(bits=bits, group_size=32, symmetric=False))
    layer = layer_class.from_quantized(qw)
    assert isinstance(layer, DequantLinear)
    assert torch.equal(weight_out_in(layer), qw.dequantize())


def test_zero_point_zero_is_refused():
    weight, _, _ = _layer_inputs(seed=6)
    qw = rtn_quantize(
        weight.abs(), QuantScheme(bits=4, group_size=32, symmetric=False), min_zero=0
    )
    with pytest.raises(ValueError, match="min_zero=1"):
        QuantLinear.from_quantized(qw)


def test_sizes_that_do_not_fill_words_are_refused():
    with pytest.raises(
        ValueError, match="output size must be a multiple of 32; got 48"
    ):
        QuantLinear(64, 48, bits=3, group_size=32, bias=False)
    with pytest.raises(ValueError, match="input size must be a multiple of 8; got 20"):
        QuantLinear(20, 64, bits=4, group_size=-1, bias=False)


@pytest.mark.parametrize("layout", ["gptq", "awq", "compressed-tensors"])
def test_every_layout_unpacks_to_the_weight_it_stores(layout):
    from quantkit.quant.awq_linear import AwqLinear
    from quantkit.quant.linear import QuantLinear
    from quantkit.quant.pack_quantized_linear import PackQuantizedLinear
    from quantkit.quant.rtn import rtn_quantize
    from quantkit.quant.scheme import QuantScheme

    cls = {"gptq": QuantLinear, "awq": AwqLinear, "compressed-tensors": PackQuantizedLinear}[layout]
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    layer = cls.from_quantized(rtn_quantize(weight, scheme, min_zero=1))
    view = layer.unpacked()
    rebuilt = view.scales.float()[:, view.g_idx] * (view.codes - view.zeros[:, view.g_idx]).float()
    assert view.codes.shape == (64, 128) and view.scales.shape == (64, 4) and view.zeros.dtype == torch.int32
    torch.testing.assert_close(rebuilt, layer.dequantize_weight(), rtol=0, atol=0)
