"""Group-wise low-bit GEMM in Triton for mid-sized batches: dequantize in registers, multiply on tensor cores.

Program (m tile, n tile, k split) loads x (BLOCK_M, BLOCK_K) and the packed words
(BLOCK_K / pack, BLOCK_N), unpacks the words to codes (BLOCK_K, BLOCK_N) and multiplies. When a K
tile lies inside one group, the codes go to the dot unscaled (small integers are exact in 16-bit
floats) and the group's scale and zero point are applied to the float32 tile result:
``scale * (x @ codes - rowsum(x) * zero)``; otherwise each element is dequantized first. With
SPLIT_K > 1 partial tiles are atomically added to a float32 workspace.

FAST_CODES (16-bit activations, codes that fit the mantissa) makes the 16-bit codes by bit
operations instead of integer-to-float conversions: a code ORed into the bits of 128.0 (bfloat16)
or 1024.0 (float16) is that float plus the code exactly; the offset joins the zero point.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def w4a16_gemm_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    k_per_split,
    BITS: tl.constexpr,
    PACK: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_CODES: tl.constexpr = 0,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = m < M
    n_valid = n < N
    words = tl.arange(0, BLOCK_K // PACK)
    shifts = (tl.arange(0, PACK) * BITS)[None, :, None]
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = tl.program_id(2) * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_valid = k < K
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k_valid, other=0)
        else:
            col = k
        x = tl.load(
            x_rows + col[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0
        )
        word = k0 // PACK + words
        w = tl.load(
            qweight_ptr + word[:, None] * N + n[None, :],
            mask=(word[:, None] * PACK < K) & n_valid[None, :],
            other=0,
        )
        codes = tl.reshape(
            (w[:, None, :] >> shifts) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N)
        )
        if GROUP_SIZE % BLOCK_K == 0 and FAST_CODES != 0:
            # FAST_CODES 1: bfloat16 (offset 128), 2: float16 (offset 1024)
            if FAST_CODES == 1:
                magic = 0x4300
                offset = 128.0
            else:
                magic = 0x6400
                offset = 1024.0
            tile = (codes | magic).to(tl.int16).to(x.dtype, bitcast=True)
            g = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + g * N + n, mask=n_valid, other=0.0).to(
                tl.float32
            )
            zero = tl.load(zeros_ptr + g * N + n, mask=n_valid, other=0.0).to(
                tl.float32
            )
            part = tl.dot(x, tile, input_precision=DOT_PRECISION)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += scale[None, :] * (part - x_sum[:, None] * (zero[None, :] + offset))
        elif GROUP_SIZE % BLOCK_K == 0:
            g = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + g * N + n, mask=n_valid, other=0.0).to(
                tl.float32
            )
            zero = tl.load(zeros_ptr + g * N + n, mask=n_valid, other=0.0).to(
                tl.float32
            )
            part = tl.dot(x, codes.to(x.dtype), input_precision=DOT_PRECISION)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += scale[None, :] * (part - x_sum[:, None] * zero[None, :])
        else:
            params = (k // GROUP_SIZE)[:, None] * N + n[None, :]
            mask = k_valid[:, None] & n_valid[None, :]
            scale = tl.load(scales_ptr + params, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + params, mask=mask, other=0.0).to(tl.float32)
            weight = ((codes.to(tl.float32) - zero) * scale).to(x.dtype)
            acc += tl.dot(x, weight, input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :]
    out_mask = m_valid[:, None] & n_valid[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)[
                None, :
            ]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
