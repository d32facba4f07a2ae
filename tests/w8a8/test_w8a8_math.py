"""8-bit quantization math: scales, the INT8 and e4m3 grids, activation modes, the exact GEMM emulation."""

import pytest
import torch

from quantkit.quant.w8a8 import (
    FP8_DTYPE,
    MIN_SCALE,
    dequantize,
    fake_quantize_activation,
    quantize,
    quantize_activation,
    quantize_weight,
    w8a8_matmul_reference,
    weight_scale,
)


def _e4m3_grid() -> torch.Tensor:
    """Every finite non-negative e4m3fn value, built from its definition (bias 7, 3 mantissa bits)."""
    values = [m / 8 * 2.0**-6 for m in range(8)]  # subnormals
    values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if not (e == 15 and m == 7)]
    return torch.tensor(sorted(values), dtype=torch.float64)


def test_fp8_rounding_is_to_the_nearest_grid_value():
    grid = _e4m3_grid()
    assert grid.max() == 448
    x = torch.randn(4000, dtype=torch.float64) * torch.logspace(-3, 2.6, 4000, dtype=torch.float64)
    q = quantize(x, torch.ones(1), "float")
    assert q.dtype == FP8_DTYPE
    got = q.to(torch.float64)
    nearest = grid[(x.abs()[:, None] - grid[None, :]).abs().argmin(dim=1)] * x.sign()
    distance_got = (got - x).abs()
    distance_best = (nearest - x).abs()
    assert bool((distance_got <= distance_best + 1e-12 * x.abs()).all())
    assert float(quantize(torch.tensor([1e6, -1e6]), torch.ones(1), "float").float().abs().max()) == 448  # saturates


def test_int8_weights_per_channel_and_per_tensor():
    w = torch.randn(6, 10)
    w[2] = 0.0  # an all-zero row keeps a positive scale
    record = quantize_weight(w, "int", "channel", "dynamic")
    assert record.weight.dtype == torch.int8 and record.weight_scale.shape == (6, 1)
    torch.testing.assert_close(record.weight_scale[[0, 1]], w[[0, 1]].abs().amax(1, keepdim=True) / 127)
    assert float(record.weight_scale[2]) == float(torch.tensor(MIN_SCALE)) and not record.weight[2].any()
    assert int(record.weight.abs().max()) == 127
    assert (record.dequantize() - w).abs().max() <= record.weight_scale.max() / 2 + 1e-7
    tensor = quantize_weight(w, "int", "tensor", "static", input_scale=torch.tensor([0.5]))
    assert tensor.weight_scale.shape == (1,) and tensor.input_scale.item() == 0.5
    torch.testing.assert_close(tensor.weight_scale, w.abs().max().reshape(1) / 127)


def test_fp8_weight_scale_maps_the_largest_weight_to_448():
    w = torch.randn(5, 16) * 3
    scale = weight_scale(w, "float", "channel")
    q = quantize(w, scale, "float")
    torch.testing.assert_close(q.float().abs().amax(1), torch.full((5,), 448.0))


def test_dynamic_activations_are_per_token_and_static_ones_clip():
    x = torch.randn(3, 5, 32)
    codes, scale = quantize_activation(x, "int")
    assert codes.dtype == torch.int8 and scale.shape == (3, 5, 1)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127)
    torch.testing.assert_close(dequantize(codes, scale), x, atol=float(scale.max()) / 2 + 1e-7, rtol=0)
    small = torch.tensor([0.01])
    codes, scale = quantize_activation(x, "int", small)
    assert scale.shape == (1,) and int(codes.max()) == 127 and int(codes.min()) == -128
    zero_rows = fake_quantize_activation(torch.zeros(2, 8), "float")
    assert bool((zero_rows == 0).all())


@pytest.mark.parametrize("kind", ["int", "float"])
def test_gemm_emulation_is_exact(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3000, generator=gen)
    w = torch.randn(9, 3000, generator=gen)
    xq, xs = quantize_activation(x, kind)
    record = quantize_weight(w, kind, "channel", "dynamic")
    got = w8a8_matmul_reference(xq, xs, record.weight, record.weight_scale, out_dtype=torch.float64)
    if kind == "int":  # integer sums well past 2**24: exact in int64
        exact = (xq.long() @ record.weight.long().t()).double()
        want = (exact.float() * xs.float() * record.weight_scale.reshape(1, -1)).double()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # e4m3 products are exact in float32; only the float32 sum rounds
        exact = xq.double() @ record.weight.double().t() * xs.double() * record.weight_scale.double().reshape(1, -1)
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    reference = x.double() @ w.double().t()
    relative = float((got - reference).norm() / reference.norm())
    assert relative < (0.02 if kind == "int" else 0.06)  # Gaussian data, per-token scales
