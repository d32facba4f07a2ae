"""Triton kernels of ``quant_fused``: residual add + RMSNorm + 8-bit quantization, and
``silu(gate) * up`` + 8-bit quantization, one program per row holding the row in registers.

The 16-bit value each row would have been stored as is computed exactly as ``layer_ops_triton``
computes it, then quantized as ``act_quant_triton`` quantizes (per-token scale ``absmax / QMAX``
or a static scale; INT8 half to even, e4m3 rounded before the conversion).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.act_quant_triton import _round_half_even, round_to_e4m3
from quantkit.kernels.backend import next_power_of_2
from quantkit.kernels.layer_ops_triton import (
    _check_rows,
    _warps,
    add_rms_norm_row,
    silu_and_mul_row,
    summed_output,
)
from quantkit.kernels.quant_fused import QuantizedInput
from quantkit.quant.w8a8 import MIN_SCALE, qmax, storage_dtype


@triton.jit
def _quantize_row(y, valid, q_row_ptr, scale_ptr, static_scale_ptr, cols, QMAX: tl.constexpr,
                  MIN_SCALE_C: tl.constexpr, IS_INT: tl.constexpr, STATIC: tl.constexpr):
    """Store the 8-bit codes of one float32 row ``y`` (and, dynamic, its scale at ``scale_ptr``)."""
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.where(valid, tl.abs(y), 0.0), 0), QMAX), MIN_SCALE_C)
        tl.store(scale_ptr, scale)
    q = tl.math.div_rn(y, scale)  # IEEE division, as torch (see act_quant_triton)
    if IS_INT:
        q = tl.minimum(tl.maximum(_round_half_even(q), -128.0), 127.0)
    else:
        q = round_to_e4m3(tl.minimum(tl.maximum(q, -QMAX), QMAX))
    tl.store(q_row_ptr + cols, q.to(q_row_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _add_rms_norm_quant_kernel(x_ptr, res_ptr, w_ptr, q_ptr, scale_ptr, static_scale_ptr, res_out_ptr, N, stride_x,
                               stride_res, stride_q, stride_res_out, eps, QMAX: tl.constexpr,
                               MIN_SCALE_C: tl.constexpr, IS_INT: tl.constexpr, STATIC: tl.constexpr,
                               HAS_RESIDUAL: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    y = add_rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, valid, N, stride_x, stride_res,
                         stride_res_out, eps, HAS_RESIDUAL)
    y = y.to(OUT_DTYPE).to(tl.float32)  # the 16-bit value the unfused path would store
    _quantize_row(y, valid, q_ptr + row * stride_q, scale_ptr + row, static_scale_ptr, cols, QMAX, MIN_SCALE_C,
                  IS_INT, STATIC)


@triton.jit
def _silu_and_mul_quant_kernel(gate_ptr, up_ptr, q_ptr, scale_ptr, static_scale_ptr, N, stride_gate, stride_up,
                               stride_q, QMAX: tl.constexpr, MIN_SCALE_C: tl.constexpr, IS_INT: tl.constexpr,
                               STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    y = silu_and_mul_row(gate_ptr, up_ptr, row, cols, valid, stride_gate, stride_up)
    y = y.to(up_ptr.dtype.element_ty).to(tl.float32)  # the 16-bit value the unfused path would store
    _quantize_row(y, valid, q_ptr + row * stride_q, scale_ptr + row, static_scale_ptr, cols, QMAX, MIN_SCALE_C,
                  IS_INT, STATIC)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _outputs(rows: int, n: int, kind: str, input_scale: torch.Tensor | None, device):
    q = torch.empty(rows, n, dtype=storage_dtype(kind), device=device)
    if input_scale is not None:
        scale = input_scale.to(torch.float32).reshape(1)
    else:
        scale = torch.empty(rows, 1, dtype=torch.float32, device=device)
    return q, scale


def add_rms_norm_quant_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                              kind: str, input_scale: torch.Tensor | None = None
                              ) -> tuple[QuantizedInput, torch.Tensor]:
    _check_rows(x, "x")
    rows, n = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    summed = summed_output(x, residual)
    q, scale = _outputs(rows, n, kind, input_scale, x.device)
    if rows:
        block = next_power_of_2(n)
        res = residual if residual is not None else x
        _add_rms_norm_quant_kernel[(rows,)](
            x, res, weight, q, scale, scale, summed, n, x.stride(0), res.stride(0), q.stride(0), summed.stride(0),
            eps, QMAX=qmax(kind), MIN_SCALE_C=MIN_SCALE, IS_INT=kind == "int", STATIC=input_scale is not None,
            HAS_RESIDUAL=residual is not None, OUT_DTYPE=_TL_DTYPES[out_dtype], BLOCK=block, num_warps=_warps(block))
    return QuantizedInput(q, scale, out_dtype), summed


def silu_and_mul_quant_triton(gate: torch.Tensor, up: torch.Tensor, kind: str,
                              input_scale: torch.Tensor | None = None) -> QuantizedInput:
    _check_rows(gate, "gate")
    _check_rows(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    rows, n = gate.shape
    q, scale = _outputs(rows, n, kind, input_scale, gate.device)
    if rows and n:
        block = next_power_of_2(n)
        _silu_and_mul_quant_kernel[(rows,)](
            gate, up, q, scale, scale, n, gate.stride(0), up.stride(0), q.stride(0), QMAX=qmax(kind),
            MIN_SCALE_C=MIN_SCALE, IS_INT=kind == "int", STATIC=input_scale is not None, BLOCK=block,
            num_warps=_warps(block))
    return QuantizedInput(q, scale, up.dtype)
