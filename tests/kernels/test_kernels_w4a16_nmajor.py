"""The N-major W4A16 kernels (GEMV and swapped-operand GEMM) against the plain-torch reference."""

import pytest
import torch
from kernel_cases import (
    BF16_DOT,
    assert_close_scaled,
    needs_triton,
    quantized_case,
    triton_device,
)

from quantkit.kernels.packed_weight import quantized_linear_reference
from quantkit.kernels.w4a16_nmajor_triton import linear_nmajor, nmajor_supported


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, BF16_DOT])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("m, k, n, split_k", [(1, 256, 96, 1), (3, 256, 80, 2), (20, 384, 64, 3)])
def test_nmajor_kernels_equal_the_reference(dtype, kernel, m, k, n, split_k):
    device = triton_device()
    case = quantized_case(n, k, 128, 4, device=device, seed=m)
    packed = case.pack()
    assert nmajor_supported(packed, 128)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype)
    want = quantized_linear_reference(x.float(), packed, bias.float()).to(dtype)
    got = linear_nmajor(x, packed, packed.qweight.t().contiguous(), bias, kernel=kernel, block_n=32, block_k=128,
                        split_k=split_k)
    assert_close_scaled(got, want, dtype)


def test_nmajor_needs_whole_groups_and_no_permutation():
    packed = quantized_case(32, 256, 64, 4).pack()
    assert not nmajor_supported(packed, 128)  # a 128-wide K tile would span two groups
    assert not nmajor_supported(quantized_case(32, 256, 128, 4, act_order=True).pack(), 128)
