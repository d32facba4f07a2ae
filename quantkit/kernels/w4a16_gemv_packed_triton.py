"""Batch-1 W4A16 GEMV with packed (two codes per instruction) unpacking, for large 4-bit weights.

Same layout, grid and split-K scheme as ``w4a16_gemv_triton.w4a16_gemv_kernel`` restricted to
4-bit codes and K tiles inside one group (``GROUP_SIZE % BLOCK_K == 0``). The plain kernel spends
about five instructions per 4-bit code (shift, and/or with 2**23, float subtract, multiply, add),
which bounds it by instruction issue before DRAM bandwidth. Here each packed word is unpacked by a
few lines of PTX with the float16 magic-number trick:

    lop3.b32 t, w >> (4 * j), 0x000F000F, 0x64006400, 0xea   // (a & b) | c

leaves in ``t`` two float16 values, ``1024 + code[j]`` (low half) and ``1024 + code[j + 4]``
(high half), exactly. Each half is widened with ``cvt.f32.f16``: per 8 codes 3 shifts, 4 lop3 and
8 conversions, then one fused multiply-add per code. The 1024 offsets are removed once per tile:

    sum(code * x) - zero * sum(x) = sum((1024 + code) * x) - (1024 + zero) * sum(x)

Numerics: (1024 + code) has 11 significant bits and x (bf16/fp16) at most 11, so every product is
exact in float32; the float32 sums of BLOCK_K terms of size ~1024 |x| carry a rounding error
around 1024 * 2**-24 |x| per term (about 6e-5 |x|), orders of magnitude below the bf16/fp16 output
rounding of the result (tested in tests/kernels/test_kernels_w4a16_gemv_packed.py).

The PTX cannot run under TRITON_INTERPRET, so it runs on CUDA only: ``quantized_linear`` takes it
for one row of x against a weight of ``PACKED_GEMV_MIN_WEIGHTS`` or more values
(``kernels/w4a16_triton.py``, measured in scripts/gpu/bench_w4a16_gemv_packed.py);
``quantized_linear_gemv_packed`` runs it with explicit tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.packed_weight import PackedWeight
from quantkit.kernels.w4a16_triton import GemmConfig, quantized_linear_triton

# outputs $0..$7 = 1024 + code 0..7 of the word as float32 bits; input $8 = the word
_UNPACK_ASM = tl.constexpr(
    """
{
    .reg .b32 t<4>;
    .reg .b32 s<3>;
    .reg .b16 h<8>;
    shr.u32 s0, $8, 4;
    shr.u32 s1, $8, 8;
    shr.u32 s2, $8, 12;
    lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xea;
    lop3.b32 t1, s0, 0x000F000F, 0x64006400, 0xea;
    lop3.b32 t2, s1, 0x000F000F, 0x64006400, 0xea;
    lop3.b32 t3, s2, 0x000F000F, 0x64006400, 0xea;
    mov.b32 {h0, h4}, t0;
    mov.b32 {h1, h5}, t1;
    mov.b32 {h2, h6}, t2;
    mov.b32 {h3, h7}, t3;
    cvt.f32.f16 $0, h0;
    cvt.f32.f16 $1, h1;
    cvt.f32.f16 $2, h2;
    cvt.f32.f16 $3, h3;
    cvt.f32.f16 $4, h4;
    cvt.f32.f16 $5, h5;
    cvt.f32.f16 $6, h6;
    cvt.f32.f16 $7, h7;
}
"""
)


@triton.jit
def _unpack8(w):
    """(1024 + code j) as float32 for j = 0..7 of every int32 word of w."""
    return tl.inline_asm_elementwise(
        asm=_UNPACK_ASM,
        constraints="=f,=f,=f,=f,=f,=f,=f,=f,r",
        args=[w],
        dtype=(
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
        ),
        is_pure=True,
        pack=1,
    )


@triton.jit
def w4a16_gemv_packed_kernel(
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
):
    tl.static_assert(BITS == 4)
    tl.static_assert(PACK == 8)
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < N
    words = tl.arange(0, BLOCK_K // 8)
    x_row = x_ptr + row.to(tl.int64) * stride_xm

    acc = tl.zeros([BLOCK_N], tl.float32)
    k_begin = tl.program_id(2) * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_stop, BLOCK_K):
        word = k0 // 8 + words
        w = tl.load(
            qweight_ptr + word[:, None] * N + n[None, :],
            mask=(word[:, None] * 8 < K) & n_valid[None, :],
            other=0,
        )
        # x as a (words, 8) tile (one vector load per word), split into the x of code j of every
        # word (lane j = 4a + 2b + c of the (words, 2, 2, 2) view; tl.split takes the last axis)
        k = k0 + words[:, None] * 8 + tl.arange(0, 8)[None, :]
        k_valid = k < K
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k_valid, other=0)
        else:
            col = k
        x = tl.load(x_row + col, mask=k_valid, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 8, 2, 2, 2)))
        x_e0, x_e1 = tl.split(x_even)
        x_o0, x_o1 = tl.split(x_odd)
        x0, x4 = tl.split(x_e0)
        x2, x6 = tl.split(x_e1)
        x1, x5 = tl.split(x_o0)
        x3, x7 = tl.split(x_o1)
        c0, c1, c2, c3, c4, c5, c6, c7 = _unpack8(w)
        prod = c0 * x0[:, None]
        prod += c1 * x1[:, None]
        prod += c2 * x2[:, None]
        prod += c3 * x3[:, None]
        prod += c4 * x4[:, None]
        prod += c5 * x5[:, None]
        prod += c6 * x6[:, None]
        prod += c7 * x7[:, None]
        dot = tl.sum(prod, axis=0)  # sum((1024 + code) * x)
        x_sum = tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), axis=0)
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + n, mask=n_valid, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + n, mask=n_valid, other=0.0).to(tl.float32)
        acc += scale * (dot - (zero + 1024.0) * x_sum)

    out_ptrs = out_ptr + row.to(tl.int64) * stride_om + n
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid)
    else:
        tl.atomic_add(out_ptrs, acc, mask=n_valid)


def supports(packed: PackedWeight, block_k: int) -> bool:
    """Whether the packed kernel handles this weight with K tiles of block_k."""
    return packed.bits == 4 and packed.group_size % block_k == 0


def quantized_linear_gemv_packed(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 128,
    block_k: int = 128,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a few rows of x (float16/bfloat16) on CUDA, 4-bit weights only,
    with explicit tiles (``quantized_linear`` picks this kernel itself where it pays)."""
    if not supports(packed, block_k):
        raise ValueError(
            f"the packed GEMV needs 4-bit codes and group_size % block_k == 0, got bits="
            f"{packed.bits} group_size={packed.group_size} block_k={block_k}"
        )
    config = GemmConfig("gemv-packed", block_m=1, block_n=block_n, block_k=block_k, split_k=split_k,
                        num_warps=num_warps, num_stages=num_stages)
    return quantized_linear_triton(x, packed, bias, config=config)
