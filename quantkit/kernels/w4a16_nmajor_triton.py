"""W4A16 kernels on the output-major ("N-major") packing: one row of words per output feature.

``PackedWeight.qweight`` is GPTQ's (K / pack, N): each int32 word holds ``pack`` consecutive
input features of one output. Its transpose ``qweight.t().contiguous()`` (N, K / pack) keeps the
same words but puts one output's words next to each other, so a tile of outputs loads whole
contiguous runs along K and unpacks, without any shuffle, into a (BLOCK_N, BLOCK_K) tile whose
K order is the natural one.

* GEMM (swapped operands, for a handful to a few hundred rows of x): ``out.T = W @ x.T``; the
  unpacked weight tile is the dot's left operand (in registers), x.T the right one, so BLOCK_M
  can be as small as 16 while the tensor cores still see 64+ rows of W. Codes become 16-bit
  floats by ORing them into the bits of 128.0 (bfloat16) or 1024.0 (float16); the offset joins
  the zero point: ``scale * (W_codes @ x.T - (zero + offset) * colsum(x.T))``.
* GEMV (one to a few rows of x): the same tile, multiplied and reduced in float32.

Both need K a multiple of BLOCK_K and BLOCK_K dividing the group size (group-wise scales, one
group per K tile); ``w4a16_triton`` checks that before choosing them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def w4a16_gemm_nmajor_kernel(
    x_ptr,
    qweight_t_ptr,
    scales_ptr,
    zeros_ptr,
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
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MAGIC: tl.constexpr,
    OFFSET: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_valid = n < N
    m_valid = m < M
    words = tl.arange(0, BLOCK_K // PACK)
    shifts = tl.arange(0, PACK) * BITS
    ks = tl.arange(0, BLOCK_K)
    w_rows = qweight_t_ptr + n.to(tl.int64)[:, None] * (K // PACK)
    x_cols = x_ptr + m.to(tl.int64)[None, :] * stride_xm

    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    k_begin = tl.program_id(2) * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_stop, BLOCK_K):
        w = tl.load(
            w_rows + (k0 // PACK + words)[None, :], mask=n_valid[:, None], other=0
        )
        codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        tile = (
            tl.reshape(codes | MAGIC, (BLOCK_N, BLOCK_K))
            .to(tl.int16)
            .to(x_ptr.dtype.element_ty, bitcast=True)
        )
        x_t = tl.load(x_cols + (k0 + ks)[:, None], mask=m_valid[None, :], other=0.0)
        part = tl.dot(tile, x_t)
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + n, mask=n_valid, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + n, mask=n_valid, other=0.0).to(tl.float32)
        x_sum = tl.sum(x_t.to(tl.float32), axis=0)
        acc += scale[:, None] * (part - (zero + OFFSET)[:, None] * x_sum[None, :])

    out_ptrs = out_ptr + m.to(tl.int64)[None, :] * stride_om + n[:, None]
    out_mask = n_valid[:, None] & m_valid[None, :]
    if not ATOMIC:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)[
                :, None
            ]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def w4a16_gemv_nmajor_kernel(
    x_ptr,
    qweight_t_ptr,
    scales_ptr,
    zeros_ptr,
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
    ATOMIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < N
    words = tl.arange(0, BLOCK_K // PACK)
    lanes = tl.arange(0, PACK)
    shifts = lanes * BITS
    w_rows = qweight_t_ptr + n.to(tl.int64)[:, None] * (K // PACK)
    x_row = x_ptr + row.to(tl.int64) * stride_xm

    acc = tl.zeros([BLOCK_N], tl.float32)
    k_begin = tl.program_id(2) * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_stop, BLOCK_K):
        w = tl.load(
            w_rows + (k0 // PACK + words)[None, :], mask=n_valid[:, None], other=0
        )
        # code + 2**23 as a float32 by bits, minus 2**23: no integer-to-float conversion
        codes = (
            ((w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)) | 0x4B000000
        ).to(tl.float32, bitcast=True) - 8388608.0
        x = tl.load(x_row + k0 + words[:, None] * PACK + lanes[None, :]).to(tl.float32)
        dot = tl.sum(tl.sum(codes * x[None, :, :], axis=2), axis=1)
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + n, mask=n_valid, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + n, mask=n_valid, other=0.0).to(tl.float32)
        acc += scale * (dot - zero * tl.sum(tl.sum(x, axis=1), axis=0))

    out_ptrs = out_ptr + row.to(tl.int64) * stride_om + n
    if not ATOMIC:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid)
    else:
        tl.atomic_add(out_ptrs, acc, mask=n_valid)


def nmajor_supported(packed, block_k: int) -> bool:
    """Whether the N-major kernels apply: no act-order permutation, K tiles inside one group."""
    return (
        packed.perm is None
        and packed.in_features % block_k == 0
        and packed.group_size % block_k == 0
        and block_k % packed.pack == 0
    )


def linear_nmajor(
    x,
    packed,
    qweight_t,
    bias,
    *,
    kernel: str,
    block_n: int,
    block_k: int,
    block_m: int = 16,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """``x @ W.T (+ bias)`` for 2-D x (M, K) with the N-major kernels; split_k > 1 sums in float32."""
    import torch

    m, k = x.shape
    n = packed.out_features
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else packed.scales
    common = {
        "BITS": packed.bits,
        "PACK": packed.pack,
        "GROUP_SIZE": packed.group_size,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "ATOMIC": split_k > 1,
        "HAS_BIAS": bias is not None,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }
    args = (x, qweight_t, packed.scales, packed.zeros, bias_arg, out)
    if kernel == "gemv":
        grid = (m, triton.cdiv(n, block_n), split_k)
        w4a16_gemv_nmajor_kernel[grid](
            *args, n, k, x.stride(0), out.stride(0), k_per_split, **common
        )
    else:
        magic, offset = (
            (0x4300, 128.0) if x.dtype == torch.bfloat16 else (0x6400, 1024.0)
        )
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
        w4a16_gemm_nmajor_kernel[grid](
            *args,
            m,
            n,
            k,
            x.stride(0),
            out.stride(0),
            k_per_split,
            BLOCK_M=block_m,
            MAGIC=magic,
            OFFSET=offset,
            **common,
        )
    if split_k == 1:
        return out
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
