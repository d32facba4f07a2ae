"""Group-wise low-bit GEMV in Triton: y[m] = W @ x[m] for a handful of rows (batch-1 decode).

One program computes BLOCK_N outputs of one row of x over a range of K (split-K): it streams the
packed words (BLOCK_K / pack, BLOCK_N) of ``PackedWeight.qweight``, unpacks them into a
(words, pack, BLOCK_N) tile (no reshape, so each word is loaded once) and reduces against x with
plain multiply-adds. When a K tile lies inside one group the scale and zero point are applied
once per tile: ``scale * (sum(code * x) - zero * sum(x))``. Programs of different rows of x that
read the same weight tile are launched next to each other (row is the fastest grid axis), so the
weight comes from DRAM about once. With SPLIT_K > 1 the partial sums are atomically added to a
float32 workspace (bias and cast happen outside).

FAST_CODES turns codes into floats without the integer-to-float conversion instruction (a
quarter-rate instruction that bounds this kernel before memory does): a code ORed into the
mantissa of 2**23 is the float 2**23 + code exactly, and one subtraction leaves the code.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def w4a16_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_om,
    k_per_split,
    BITS: tl.constexpr,
    PACK: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FAST_CODES: tl.constexpr = False,
):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < N
    words = tl.arange(0, BLOCK_K // PACK)
    lanes = tl.arange(0, PACK)
    shifts = (lanes * BITS)[None, :, None]
    x_row = x_ptr + row.to(tl.int64) * stride_xm

    acc = tl.zeros([BLOCK_N], tl.float32)
    k_begin = tl.program_id(2) * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_stop, BLOCK_K):
        k = k0 + words[:, None] * PACK + lanes[None, :]
        k_valid = k < K
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k_valid, other=0)
        else:
            col = k
        x = tl.load(x_row + col, mask=k_valid, other=0.0).to(tl.float32)
        word = k0 // PACK + words
        w = tl.load(
            qweight_ptr + word[:, None] * N + n[None, :],
            mask=(word[:, None] * PACK < K) & n_valid[None, :],
            other=0,
        )
        if FAST_CODES:
            codes = (((w[:, None, :] >> shifts) & ((1 << BITS) - 1)) | 0x4B000000).to(
                tl.float32, bitcast=True
            ) - 8388608.0
        else:
            codes = ((w[:, None, :] >> shifts) & ((1 << BITS) - 1)).to(tl.float32)
        if GROUP_SIZE % BLOCK_K == 0:
            g = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + g * N + n, mask=n_valid, other=0.0).to(
                tl.float32
            )
            zero = tl.load(zeros_ptr + g * N + n, mask=n_valid, other=0.0).to(
                tl.float32
            )
            dot = tl.sum(tl.sum(codes * x[:, :, None], axis=1), axis=0)
            acc += scale * (dot - zero * tl.sum(tl.sum(x, axis=1), axis=0))
        else:
            params = (k // GROUP_SIZE)[:, :, None] * N + n[None, None, :]
            mask = k_valid[:, :, None] & n_valid[None, None, :]
            scale = tl.load(scales_ptr + params, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + params, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(
                tl.sum((codes - zero) * scale * x[:, :, None], axis=1), axis=0
            )

    out_ptrs = out_ptr + row.to(tl.int64) * stride_om + n
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid)
    else:
        tl.atomic_add(out_ptrs, acc, mask=n_valid)
