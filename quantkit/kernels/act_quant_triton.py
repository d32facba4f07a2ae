"""Activation quantization in Triton: each row of x (M, K) to INT8 or FP8 e4m3 in one program.

Dynamic (per token): the row's largest magnitude gives the scale ``absmax / QMAX`` (at least
``MIN_SCALE``), then each value is divided and rounded — INT8 half to even, as ``torch.round``
does, FP8 by the conversion's own round-to-nearest-even — and stores the codes and the scale.
Rows up to ``ONE_BLOCK_MAX`` wide (every Llama linear input) are read once and held in registers;
wider ones are read twice. Static (per tensor): the given scale. Same results as
``quant.w8a8.quantize_activation``.

Every float32 division is ``tl.math.div_rn`` (IEEE round to nearest, as torch divides): Triton's
``/`` lowers to ``div.full.f32`` on NVIDIA GPUs (up to 2 ulp off, triton-lang/triton#10661), which
moves quotients that land on a rounding midpoint to the other code — the H100 run of
``test_gpu_activation_quantization_equals_torch`` caught it; the interpreter divides exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.backend import next_power_of_2
from quantkit.quant.w8a8 import MIN_SCALE, qmax, storage_dtype


@triton.jit
def _round_half_even(y):
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def round_to_e4m3(y):
    """float32 ``y`` (|y| <= 448) rounded to the nearest e4m3 value, ties to even, still float32.

    The conversion to ``tl.float8e4nv`` rounds the same way on the GPU; rounding first makes that
    conversion exact everywhere (Triton's CPU interpreter mis-rounds values that carry into the
    next binade). Normal numbers keep 3 of float32's 23 mantissa bits; below 2**-6 (subnormals)
    the step is 2**-9.
    """
    y_bits = y.to(tl.int32, bitcast=True)
    lsb = (y_bits >> 20) & 1
    normal = ((y_bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    magnitude = _round_half_even(tl.abs(y) * 512.0) * 0.001953125  # / 512, exact
    # the sign from y's sign bit, and by a multiplication: Triton 3.6 (the H100 run's) compiles ``-m`` as
    # ``0 - m``, +0.0 for m = +0.0 (fixed upstream by triton-lang/triton#10270), so negatives rounding to
    # zero stored 0x00 where torch stores -0.0 (0x80): the H100 caught it, the interpreter did not
    subnormal = tl.where(y_bits < 0, magnitude * -1.0, magnitude)
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _codes(x, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """float32 ``x / scale`` on the 8-bit grid (still float32)."""
    y = tl.math.div_rn(x, scale)
    if IS_INT:
        y = tl.minimum(tl.maximum(_round_half_even(y), -128.0), 127.0)
    else:
        y = round_to_e4m3(tl.minimum(tl.maximum(y, -QMAX), QMAX))
    return y


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    static_scale_ptr,
    K,
    stride_xm,
    stride_qm,
    QMAX: tl.constexpr,
    MIN_SCALE_C: tl.constexpr,
    IS_INT: tl.constexpr,
    STATIC: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if ONE_BLOCK:  # the row fits one block: read once, keep it in registers
        k = tl.arange(0, BLOCK)
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 0), QMAX), MIN_SCALE_C)
            tl.store(scale_ptr + row, scale)
        tl.store(q_row + k, _codes(x, scale, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=k < K)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
        else:
            absmax = tl.zeros([BLOCK], tl.float32)
            for k0 in range(0, K, BLOCK):
                k = k0 + tl.arange(0, BLOCK)
                x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
                absmax = tl.maximum(absmax, tl.abs(x))
            scale = tl.maximum(tl.math.div_rn(tl.max(absmax, 0), QMAX), MIN_SCALE_C)
            tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            tl.store(q_row + k, _codes(x, scale, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=k < K)


# Rows up to this width are read once and held in registers (16 warps: 32 values per thread at most).
ONE_BLOCK_MAX = 16384


def quantize_activation_triton(x: torch.Tensor, kind: str, input_scale: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (M, K), scale (M, 1) or (1,)) of x (M, K); ``input_scale`` given: static."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=storage_dtype(kind), device=x.device)
    static = input_scale is not None
    scale = input_scale.to(torch.float32).reshape(1) if static else torch.empty(m, 1, dtype=torch.float32,
                                                                                device=x.device)
    if m == 0:
        return q, scale
    one_block = next_power_of_2(k) <= ONE_BLOCK_MAX
    block = next_power_of_2(k) if one_block else min(4096, ONE_BLOCK_MAX)
    _quantize_rows_kernel[(m,)](
        x, q, scale, scale, k, x.stride(0), q.stride(0),
        QMAX=qmax(kind), MIN_SCALE_C=MIN_SCALE, IS_INT=kind == "int", STATIC=static, ONE_BLOCK=one_block,
        BLOCK=block, num_warps=max(4, min(16, block // 512)) if one_block else 4,
    )  # fmt: skip
    return q, scale
