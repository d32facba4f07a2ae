"""Triton versions of ``layer_ops_reference``: one kernel per fused operation, for decode steps
where a layer's many small element-wise kernels would cost more than its weights take to read.

* ``add_rms_norm_triton``: residual add and RMSNorm in one pass over each row (float32 sums);
* ``rotary_triton``: rotates query and key heads in place (one program per token and head);
* ``silu_and_mul_triton``: ``silu(gate) * up`` from the fused gate/up projection.

The norm and SiLU round where transformers rounds (the normalised row to the input dtype before
the weight multiply, silu(gate) before the product), so bfloat16 results differ from the
reference only by the order of the float32 sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.backend import next_power_of_2


@triton.jit
def add_rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, valid, N, stride_x, stride_res,
                     stride_res_out, eps, HAS_RESIDUAL: tl.constexpr):
    """One row of RMSNorm(x + residual) * weight, in float32 before its final rounding; stores x + residual."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=valid, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=valid)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / N
    normed = (h * tl.math.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0)
    return w.to(tl.float32) * normed.to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, stride_x, stride_res, stride_out,
                         stride_res_out, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    y = add_rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, valid, N, stride_x, stride_res,
                         stride_res_out, eps, HAS_RESIDUAL)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=valid)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``add_rms_norm_reference`` for x (T, N) with unit last stride."""
    _check_rows(x, "x")
    rows, n = x.shape
    out = torch.empty(rows, n, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    summed = summed_output(x, residual)
    if rows:
        block = next_power_of_2(n)
        _add_rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, summed, n, x.stride(0),
            (residual if residual is not None else x).stride(0), out.stride(0), summed.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block))
    return out, summed


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_cos, HALF: tl.constexpr,
                   BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    valid = d < HALF
    base = x_ptr + token * stride_t + head * stride_h
    x1 = tl.load(base + d, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + d, mask=valid, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + token * stride_cos + d, mask=valid, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_cos + HALF + d, mask=valid, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * stride_cos + d, mask=valid, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_cos + HALF + d, mask=valid, other=0.0).to(tl.float32)
    tl.store(base + d, (x1 * cos1 - x2 * sin1).to(x_ptr.dtype.element_ty), mask=valid)
    tl.store(base + HALF + d, (x2 * cos2 + x1 * sin2).to(x_ptr.dtype.element_ty), mask=valid)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, H, D) in place (views with strided tokens and heads are fine); returns x."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"x must be (tokens, heads, head_dim) with unit last stride, got {tuple(x.shape)}")
    tokens, heads, dim = x.shape
    if dim % 2:
        raise ValueError(f"head_dim must be even, got {dim}")
    if cos.shape != (tokens, dim) or sin.shape != cos.shape or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos and sin must both be ({tokens}, {dim}) with unit last stride")
    if tokens and heads:
        half = dim // 2
        _rotary_kernel[(tokens, heads)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HALF=half,
                                        BLOCK=next_power_of_2(half), num_warps=1)
    return x


@triton.jit
def silu_and_mul_row(gate_ptr, up_ptr, row, cols, valid, stride_gate, stride_up):
    """silu(gate) * up of one row's columns ``cols``, in float32 before its final rounding (to up's dtype)."""
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=valid, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    return act.to(tl.float32) * u.to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, N, stride_gate, stride_up, stride_out,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < N
    y = silu_and_mul_row(gate_ptr, up_ptr, row, cols, valid, stride_gate, stride_up)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=valid)


def silu_and_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for (T, N) operands with unit last stride (halves of one fused output are fine)."""
    _check_rows(gate, "gate")
    _check_rows(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    rows, n = gate.shape
    out = torch.empty(rows, n, dtype=up.dtype, device=up.device)
    if rows and n:
        block = min(1024, next_power_of_2(n))
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0),
                                                           out.stride(0), BLOCK=block, num_warps=4)
    return out


def summed_output(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """Where a residual-add kernel writes x + residual: a new tensor, or x itself without a residual."""
    if residual is None:
        return x
    _check_rows(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    return torch.empty_like(x)


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name} must be (tokens, features) with unit last stride, got shape {tuple(t.shape)}")


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))
