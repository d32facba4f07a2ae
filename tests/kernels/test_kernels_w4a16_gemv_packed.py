"""The experimental packed-unpacking GEMV (kernels/w4a16_gemv_packed_triton.py) against the reference.

The kernel uses inline PTX, so it runs on CUDA only (not under TRITON_INTERPRET). The numerics of
its 1024-offset trick are checked on the CPU by emulating the kernel's float32 arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import INTERPRET, assert_close_scaled, quantized_case

from quantkit.kernels import quantized_linear_reference

needs_cuda = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(),
    reason="inline PTX: needs CUDA and does not run under TRITON_INTERPRET",
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_k", [128, 256])
def test_offset_trick_cancellation_is_far_below_output_rounding(dtype, block_k):
    """scale * (sum((1024 + c) x) - (1024 + z) sum(x)) in float32, tile by tile, as the kernel does."""
    gen = torch.Generator().manual_seed(0)
    k, n, group = 4096, 64, 256
    codes = torch.randint(0, 16, (k, n), generator=gen).float()
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).float()
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 0.001).to(dtype).float()
    x = (torch.randn(k, generator=gen) * 3).to(dtype).float()
    acc = torch.zeros(n)
    for k0 in range(0, k, block_k):
        xs, cs = x[k0 : k0 + block_k], codes[k0 : k0 + block_k]
        dot = ((1024.0 + cs) * xs[:, None]).sum(0)  # float32 sums
        g = k0 // group
        acc += scales[g] * (dot - (zeros[g] + 1024.0) * xs.sum())
    weight = scales.repeat_interleave(group, 0).double() * (codes.double() - zeros.repeat_interleave(group, 0).double())
    exact = x.double() @ weight
    error = (acc.double() - exact).abs().max() / exact.abs().max()
    output_rounding = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    # measured ~1e-5 to 2e-5 (fp32 sums of ~1024 |x| terms): 1/30 of fp16, 1/200 of bf16 rounding
    assert error < output_rounding / 20, (error, output_rounding)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, n", [(256, 384), (4096, 4096), (2048, 3000)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "block_n, block_k, split_k, num_warps",
    [(128, 128, None, 4), (64, 128, 1, 4), (256, 256, None, 8), (128, 256, 1, 8)],
)
def test_packed_gemv_matches_reference(dtype, k, n, act_order, bias, block_n, block_k, split_k, num_warps):
    from quantkit.kernels.w4a16_gemv_packed_triton import quantized_linear_gemv_packed

    case = quantized_case(n, k, 256, 4, act_order=act_order, scale_dtype=dtype, device="cuda")
    packed = case.pack()
    gen = torch.Generator().manual_seed(k + n)
    b = torch.randn(n, generator=gen).to(dtype).cuda() if bias else None
    for m in (1, 2):
        x = torch.randn(m, k, generator=gen).to(dtype).cuda()
        got = quantized_linear_gemv_packed(
            x, packed, b, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps
        )
        assert_close_scaled(got, quantized_linear_reference(x, packed, b), dtype)


@needs_cuda
def test_packed_gemv_handles_leading_dims_and_rejects_unsupported():
    from quantkit.kernels.w4a16_gemv_packed_triton import quantized_linear_gemv_packed

    case = quantized_case(96, 512, 128, 4, device="cuda")
    packed = case.pack()
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.float16)
    got = quantized_linear_gemv_packed(x, packed)
    assert got.shape == (1, 1, 96)
    assert_close_scaled(got, quantized_linear_reference(x, packed), torch.float16)
    with pytest.raises(ValueError, match="group_size"):
        quantized_linear_gemv_packed(x, packed, block_k=256)
    with pytest.raises(ValueError, match="4-bit"):
        quantized_linear_gemv_packed(x, quantized_case(96, 512, 128, 8, device="cuda").pack())


@needs_cuda
@pytest.mark.parametrize("act_order", [False, True])
def test_default_dispatch_takes_the_packed_gemv_for_one_row_and_a_large_weight(act_order, monkeypatch):
    from quantkit.kernels import w4a16_triton

    kernels = []
    real = w4a16_triton._fused
    monkeypatch.setattr(w4a16_triton, "_fused", lambda x, p, b, config: kernels.append(config.kernel) or real(x, p, b, config))
    k = 4096
    for n, rows, expected in ((w4a16_triton.PACKED_GEMV_MIN_WEIGHTS // k, 1, "gemv-packed"),  # exactly the threshold
                              (w4a16_triton.PACKED_GEMV_MIN_WEIGHTS // k, 2, "gemv"),  # two rows keep the GEMV
                              (w4a16_triton.PACKED_GEMV_MIN_WEIGHTS // k - 128, 1, "gemv")):  # below the threshold
        case = quantized_case(n, k, 128, 4, act_order=act_order, scale_dtype=torch.bfloat16, device="cuda")
        packed = case.pack()
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n + rows)).to(torch.bfloat16).cuda()
        got = w4a16_triton.quantized_linear_triton(x, packed)
        assert_close_scaled(got, quantized_linear_reference(x, packed), torch.bfloat16)
        assert kernels[-1] == expected
