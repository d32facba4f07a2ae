"""Quantize-dequantize math: hand examples, a per-group reference, edge cases, the min_zero rule."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quant.qdq import (
    compute_qparams,
    dequantize,
    fake_quantize,
    max_code,
    quantize,
)
from quantkit.quant.scheme import QuantScheme


def _reference_group(
    values: torch.Tensor, bits: int, symmetric: bool
) -> tuple[float, int]:
    """One group's scale and zero, as the GPTQ reference code computes them (except that a
    symmetric group with no negative weight still spans [-xmax, xmax])."""
    maxq = 2**bits - 1
    xmin = torch.clamp(values.min(), max=0)
    xmax = torch.clamp(values.max(), min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    if xmin == 0 and xmax == 0:
        xmin, xmax = torch.tensor(-1.0), torch.tensor(1.0)
    scale = (xmax - xmin) / maxq
    zero = (maxq + 1) // 2 if symmetric else int(torch.round(-xmin / scale))
    return float(scale), zero


def test_asymmetric_hand_example():
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])
    scales, zeros = compute_qparams(w, bits=4, group_size=-1, symmetric=False)
    assert scales.flatten().tolist() == pytest.approx([0.2])
    assert zeros.tolist() == [[5]]
    codes = quantize(w, scales, zeros, 4, -1)
    assert codes.tolist() == [[0, 5, 8, 15]]
    assert dequantize(codes, scales, zeros, -1).tolist()[0] == pytest.approx(
        [-1.0, 0.0, 0.6, 2.0], abs=1e-6
    )


def test_symmetric_hand_example():
    # xmax = 7.5 makes the 4-bit scale exactly 1, so every division below is exact.
    w = torch.tensor([[-7.5, -2.2, 3.4, 7.5]])
    scales, zeros = compute_qparams(w, bits=4, group_size=-1, symmetric=True)
    assert scales.tolist() == [[1.0]]
    assert zeros.tolist() == [[8]]
    codes = quantize(w, scales, zeros, 4, -1)
    # ties round to even: -7.5 -> -8 (code 0) and 7.5 -> 8, which clips at code 15
    assert codes.tolist() == [[0, 6, 11, 15]]
    assert dequantize(codes, scales, zeros, -1).tolist() == [[-8.0, -2.0, 3.0, 7.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, 64, -1])
def test_matches_per_group_reference(bits, symmetric, group_size):
    generator = torch.Generator().manual_seed(bits * 100 + group_size)
    w = torch.randn(12, 64, generator=generator) * 0.05
    w[3, :16] = 0.0  # an all-zero group
    w[5] = w[5].abs()  # an all-positive row
    scales, zeros = compute_qparams(w, bits, group_size, symmetric)
    size = 64 if group_size == -1 else group_size
    for row in range(w.shape[0]):
        for g in range(64 // size):
            scale, zero = _reference_group(
                w[row, g * size : (g + 1) * size], bits, symmetric
            )
            assert scales[row, g].item() == pytest.approx(scale, rel=1e-6)
            assert zeros[row, g].item() == zero
    codes = quantize(w, scales, zeros, bits, group_size)
    assert (
        codes.dtype == torch.int32
        and scales.dtype == torch.float32
        and zeros.dtype == torch.int32
    )
    assert int(codes.min()) >= 0 and int(codes.max()) <= max_code(bits)
    expanded_scales = scales.repeat_interleave(size, dim=1)
    expanded_zeros = zeros.repeat_interleave(size, dim=1)
    expected = torch.clamp(
        torch.round(w / expanded_scales) + expanded_zeros, 0, max_code(bits)
    )
    assert torch.equal(codes, expected.to(torch.int32))
    assert torch.equal(
        dequantize(codes, scales, zeros, group_size),
        expanded_scales * (codes - expanded_zeros),
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_weights_stay_finite_and_exact(symmetric):
    w = torch.zeros(4, 32)
    scales, zeros = compute_qparams(w, 4, 16, symmetric, min_zero=1, fp16_scales=True)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    codes = quantize(w, scales, zeros, 4, 16)
    assert torch.equal(dequantize(codes, scales, zeros, 16), w)


def test_tiny_weights_give_no_nan_or_inf():
    w = torch.full((2, 8), 1e-42)
    w[1] = -1e-9
    for fp16 in (False, True):
        scales, zeros = compute_qparams(w, 4, -1, False, min_zero=1, fp16_scales=fp16)
        out = dequantize(quantize(w, scales, zeros, 4, -1), scales, zeros, -1)
        assert (
            torch.isfinite(scales).all()
            and (scales > 0).all()
            and torch.isfinite(out).all()
        )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_min_zero_keeps_zeros_storable_and_range_covered(bits):
    generator = torch.Generator().manual_seed(bits)
    w = (
        torch.rand(16, 128, generator=generator) + 0.01
    )  # all positive: the free zero point is 0
    free_scales, free_zeros = compute_qparams(w, bits, 32, False)
    assert (free_zeros == 0).all()
    scales, zeros = compute_qparams(w, bits, 32, False, min_zero=1)
    assert (zeros == 1).all()
    codes = quantize(w, scales, zeros, bits, 32)
    error = (dequantize(codes, scales, zeros, 32) - w).abs()
    # No weight is clipped: every error is within half a step of its group's grid.
    assert (error <= scales.repeat_interleave(32, dim=1) / 2 * (1 + 1e-5)).all()
    # The step grows by at most maxq / (maxq - 1) for such groups.
    maxq = max_code(bits)
    assert (scales <= free_scales * maxq / (maxq - 1) * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_min_zero_error_close_to_unconstrained_on_realistic_weights(bits):
    generator = torch.Generator().manual_seed(10 + bits)
    w = (
        torch.randn(64, 256, generator=generator) * 0.02 + 0.004
    )  # slightly off-centre like real rows
    free = dequantize(
        quantize(w, *compute_qparams(w, bits, 32, False), bits, 32),
        *compute_qparams(w, bits, 32, False),
        32,
    )
    scales, zeros = compute_qparams(w, bits, 32, False, min_zero=1)
    assert (zeros >= 1).all()
    constrained = dequantize(quantize(w, scales, zeros, bits, 32), scales, zeros, 32)
    free_mse = (free - w).pow(2).mean()
    constrained_mse = (constrained - w).pow(2).mean()
    assert constrained_mse <= free_mse * 1.05


def test_fp16_scales_are_representable_in_fp16():
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=generator)
    scales, _ = compute_qparams(w, 4, 32, True, fp16_scales=True)
    assert torch.equal(scales.half().float(), scales)
    raw, _ = compute_qparams(w, 4, 32, True)
    assert torch.allclose(scales, raw, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_keeps_dtype_and_matches_the_pieces(dtype):
    generator = torch.Generator().manual_seed(4)
    w = (torch.randn(8, 64, generator=generator) * 0.1).to(dtype)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    out = fake_quantize(w, scheme)
    assert out.dtype == dtype and out.shape == w.shape
    scales, zeros = compute_qparams(w, 4, 32, False, min_zero=1, fp16_scales=True)
    expected = dequantize(quantize(w, scales, zeros, 4, 32), scales, zeros, 32).to(
        dtype
    )
    assert torch.equal(out, expected)
    assert (out.float() - w.float()).abs().max() <= scales.max() * 0.5 + 1e-2


def test_eight_bit_error_is_small():
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=generator)
    out = fake_quantize(w, QuantScheme(bits=8, group_size=128))
    assert (out - w).norm() / w.norm() < 0.01


def test_group_size_must_divide():
    with pytest.raises(
        QuantkitError, match="group size 48 does not divide the input size 64"
    ):
        compute_qparams(torch.zeros(2, 64), 4, 48, True)


def test_min_zero_out_of_range():
    with pytest.raises(ValueError, match="min_zero"):
        compute_qparams(torch.zeros(2, 64), 2, 32, False, min_zero=3)
