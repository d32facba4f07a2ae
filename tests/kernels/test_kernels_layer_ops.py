"""The decoder layer's fused small operations: Triton against the plain-torch references."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import assert_close_scaled, needs_triton, triton_device
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from quantkit.kernels.layer_ops_reference import (
    add_rms_norm_reference,
    rotary_reference,
    silu_and_mul_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def test_reference_norm_is_transformers_rms_norm():
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.rand(64) + 0.5
    x, res = torch.randn(5, 64), torch.randn(5, 64)
    out, summed = add_rms_norm_reference(x, res, norm.weight, 1e-5)
    assert torch.equal(summed, x + res)
    assert torch.equal(out, norm(x + res))
    alone, same = add_rms_norm_reference(x, None, norm.weight, 1e-5)
    assert same is x and torch.equal(alone, norm(x))


def test_reference_rotary_is_transformers_rotary():
    q, k = torch.randn(6, 4, 32), torch.randn(6, 2, 32)
    angles = torch.randn(6, 16)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    # transformers' layout: (batch, heads, seq, dim) with cos (batch, seq, dim)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(rotary_reference(q, cos, sin), q_hf[0].transpose(0, 1))
    assert torch.equal(rotary_reference(k, cos, sin), k_hf[0].transpose(0, 1))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 64), (7, 96), (3, 1000)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_triton_matches_reference(dtype, rows, width, with_residual):
    from quantkit.kernels.layer_ops_triton import add_rms_norm_triton

    device = triton_device()
    x = _randn(rows, width, dtype=dtype, device=device, seed=1)
    res = _randn(rows, width, dtype=dtype, device=device, seed=2) if with_residual else None
    weight = (torch.rand(width, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype).to(device)
    expected, expected_sum = add_rms_norm_reference(x, res, weight, 1e-6)
    out, summed = add_rms_norm_triton(x, res, weight, 1e-6)
    assert_close_scaled(out, expected, dtype)
    if dtype == torch.float32:
        assert torch.equal(summed, expected_sum)
    else:  # one rounding of the same float32 sum (the interpreter truncates bfloat16)
        assert_close_scaled(summed, expected_sum, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,dim", [(1, 2, 16), (5, 3, 64), (4, 1, 80)])
def test_rotary_triton_matches_reference_in_place_on_strided_views(dtype, tokens, heads, dim):
    from quantkit.kernels.layer_ops_triton import rotary_triton

    device = triton_device()
    fused = _randn(tokens, 2 * heads * dim + 8, dtype=dtype, device=device, seed=4)
    x = fused[:, 8:8 + heads * dim].view(tokens, heads, dim)  # a slice of a fused projection
    angles = _randn(tokens, dim // 2, dtype=torch.float32, device=device, seed=5) * 3
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    untouched = fused[:, :8].clone(), fused[:, 8 + heads * dim:].clone()
    expected = rotary_reference(x, cos, sin)
    out = rotary_triton(x, cos, sin)
    assert out.data_ptr() == x.data_ptr()
    assert_close_scaled(out, expected, dtype)
    assert torch.equal(fused[:, :8], untouched[0]) and torch.equal(fused[:, 8 + heads * dim:], untouched[1])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 40), (6, 300), (2, 2500)])
def test_silu_and_mul_triton_matches_reference(dtype, rows, width):
    from quantkit.kernels.layer_ops_triton import silu_and_mul_triton

    device = triton_device()
    fused = _randn(rows, 2 * width, dtype=dtype, device=device, seed=6) * 3
    gate, up = fused.chunk(2, dim=-1)
    assert_close_scaled(silu_and_mul_triton(gate, up), silu_and_mul_reference(gate, up), dtype)


@needs_triton
def test_layer_ops_refuse_bad_shapes():
    from quantkit.kernels.layer_ops_triton import add_rms_norm_triton, rotary_triton, silu_and_mul_triton

    device = triton_device()
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_triton(x, torch.randn(2, 8, device=device), torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="cos and sin"):
        rotary_triton(torch.randn(3, 2, 8, device=device), torch.randn(3, 6, device=device),
                      torch.randn(3, 6, device=device))
    with pytest.raises(ValueError, match="gate"):
        silu_and_mul_triton(x, torch.randn(3, 9, device=device))
