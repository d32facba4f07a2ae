"""Dequantize a ``PackedWeight`` to a dense (in, out) matrix in Triton, for the large-batch path.

Above a few hundred rows of x a GEMM is compute-bound, so one dequantization (about the cost of
reading and writing the weight once) followed by cuBLAS beats any fused low-bit kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.packed_weight import PackedWeight


@triton.jit
def _dequantize_kernel(
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    N,
    K,
    BITS: tl.constexpr,
    PACK: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    word = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, PACK)
    n_valid = n < N
    w = tl.load(
        qweight_ptr + word[:, None] * N + n[None, :],
        mask=(word[:, None] * PACK < K) & n_valid[None, :],
        other=0,
    )
    codes = (w[:, None, :] >> (lanes * BITS)[None, :, None]) & ((1 << BITS) - 1)
    k = (word[:, None] * PACK + lanes[None, :])[:, :, None]
    mask = (k < K) & n_valid[None, None, :]
    params = (k // GROUP_SIZE) * N + n[None, None, :]
    scale = tl.load(scales_ptr + params, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + params, mask=mask, other=0.0).to(tl.float32)
    weight = (codes.to(tl.float32) - zero) * scale
    tl.store(
        out_ptr + k.to(tl.int64) * N + n[None, None, :],
        weight.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def dequantize_triton(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight transposed, (in, out) in ``dtype``, rows in packed (``perm``) order."""
    n, k = packed.out_features, packed.in_features
    out = torch.empty(k, n, dtype=dtype, device=packed.device)
    block_w, block_n = 16, 64
    grid = (triton.cdiv(packed.qweight.shape[0], block_w), triton.cdiv(n, block_n))
    _dequantize_kernel[grid](
        packed.qweight,
        packed.scales,
        packed.zeros,
        out,
        n,
        k,
        BITS=packed.bits,
        PACK=packed.pack,
        GROUP_SIZE=packed.group_size,
        BLOCK_W=block_w,
        BLOCK_N=block_n,
    )
    return out
