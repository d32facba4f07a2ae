"""Activation quantization fused into its producer: RMSNorm (+ residual add) and SiLU-and-mul write
the 8-bit codes and scales the W8A8 linear would have computed from their 16-bit output."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import needs_triton, triton_device

from quantkit.kernels.layer_ops_reference import (
    add_rms_norm_reference,
    silu_and_mul_reference,
)
from quantkit.kernels.quant_fused import (
    QuantizedInput,
    add_rms_norm_quant_reference,
    silu_and_mul_quant_reference,
)
from quantkit.kernels.w8a8 import pack_w8a8_weights, w8a8_linear
from quantkit.quant.w8a8 import quantize_activation, quantize_weight, scale_from_absmax

KINDS = ["int", "float"]


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def _same_codes(a: QuantizedInput, b: QuantizedInput):
    assert a.dtype == b.dtype
    assert torch.equal(a.codes.view(torch.int8), b.codes.view(torch.int8))
    assert torch.equal(a.scale.reshape(-1), b.scale.reshape(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_references_are_the_unfused_pairs(kind):
    x, res, w = _randn(5, 48, seed=1), _randn(5, 48, seed=2), _randn(48, seed=3).abs() + 0.5
    got, summed = add_rms_norm_quant_reference(x, res, w, 1e-5, kind)
    out, want_summed = add_rms_norm_reference(x, res, w, 1e-5)
    codes, scale = quantize_activation(out, kind)
    _same_codes(got, QuantizedInput(codes, scale, out.dtype))
    assert torch.equal(summed, want_summed)
    gate, up = _randn(5, 40, seed=4), _randn(5, 40, seed=5)
    codes, scale = quantize_activation(silu_and_mul_reference(gate, up), kind)
    _same_codes(silu_and_mul_quant_reference(gate, up, kind), QuantizedInput(codes, scale, torch.float32))


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_norm_quant_equals_reference(kind, static, dtype):
    from quantkit.kernels.act_quant_triton import quantize_activation_triton
    from quantkit.kernels.layer_ops_triton import add_rms_norm_triton
    from quantkit.kernels.quant_fused_triton import add_rms_norm_quant_triton

    device = triton_device()
    x, res = _randn(7, 96, dtype=dtype, device=device, seed=1), _randn(7, 96, dtype=dtype, device=device, seed=2)
    x[:, 5] *= 30  # an outlier channel
    w = (_randn(96, seed=3).abs() + 0.5).to(dtype).to(device)
    scale = scale_from_absmax(torch.tensor([2.0]), kind).to(device) if static else None  # static: clips
    for residual in (res, None):
        got, summed = add_rms_norm_quant_triton(x, residual, w, 1e-5, kind, scale)
        # exactly the unfused Triton pair: the same norm arithmetic, then the same rounding
        out, unfused_summed = add_rms_norm_triton(x, residual, w, 1e-5)
        codes, unfused_scale = quantize_activation_triton(out, kind, scale)
        _same_codes(got, QuantizedInput(codes, unfused_scale, out.dtype))
        assert torch.equal(summed, unfused_summed)
        want, _ = add_rms_norm_quant_reference(x, residual, w, 1e-5, kind, scale)
        if dtype == torch.float16:  # the 16-bit rounding hides the float32 sums' order: equal to the reference
            _same_codes(got, want)
        else:  # float32 norms differ from torch's by the order of the sums: a code at most one step off
            torch.testing.assert_close(got.scale, want.scale, rtol=1e-6, atol=0)
            assert (got.codes.float() - want.codes.float()).abs().max() <= (1 if kind == "int" else 32)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("static", [False, True])
def test_triton_silu_mul_quant_equals_reference(kind, static):
    from quantkit.kernels.quant_fused_triton import silu_and_mul_quant_triton

    device = triton_device()
    fused = _randn(6, 2 * 160, device=device, seed=6)  # gate and up as halves of one output
    gate, up = fused[:, :160], fused[:, 160:]
    scale = scale_from_absmax(torch.tensor([1.5]), kind).to(device) if static else None
    _same_codes(silu_and_mul_quant_triton(gate, up, kind, scale), silu_and_mul_quant_reference(gate, up, kind, scale))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_linear_on_quantized_input_equals_linear_on_x(kind, activations):
    x = _randn(9, 64, seed=7)
    input_scale = scale_from_absmax(x.abs().max().reshape(1), kind) if activations == "static" else None
    record = quantize_weight(_randn(24, 64, seed=8), kind, "channel", activations, input_scale)
    packed = pack_w8a8_weights([record.weight], [record.weight_scale], [record.input_scale], kind, activations)
    bias = _randn(24, seed=9)
    codes, scale = quantize_activation(x, kind, packed.input_scale)
    got = w8a8_linear(QuantizedInput(codes, scale, x.dtype), packed, bias)
    torch.testing.assert_close(got, w8a8_linear(x, packed, bias), rtol=0, atol=0)
    weight_only = pack_w8a8_weights([record.weight], [record.weight_scale], [None], "float", "none") \
        if kind == "float" else None
    if weight_only is not None:
        with pytest.raises(ValueError, match="weight-only"):
            w8a8_linear(QuantizedInput(codes, scale, x.dtype), weight_only)
