"""Activation quantization fused into the operation that produces the activations.

A W8A8 linear with dynamic per-token scales reads its input once to find each row's scale and
again to round it (``act_quant_triton``): a pass over x that the 16-bit model does not pay, worth
15-20% of a 4096-token GEMM on an H100 (``scripts/results/w8a8_gemm_h100_first.json``). Where the
input is produced by a row-wise operation — the residual add + RMSNorm before q/k/v and gate/up,
``silu(gate) * up`` before down — the producing kernel already holds the row in registers, so it
can write the 8-bit codes and the row's scale instead of the 16-bit row:

* ``add_rms_norm_quant``: (QuantizedInput, x + residual);
* ``silu_and_mul_quant``: QuantizedInput.

Each equals its unfused pair (``layer_ops_reference`` then ``quant.w8a8.quantize_activation``)
code for code: the 16-bit value is rounded exactly where the unfused kernel stores it. The linear
takes the ``QuantizedInput`` instead of x (``kernels/w8a8.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.kernels.backend import use_triton
from quantkit.kernels.layer_ops_reference import (
    add_rms_norm_reference,
    silu_and_mul_reference,
)
from quantkit.quant.w8a8 import quantize_activation

# Rows up to this width are held in registers by one program; wider rows fall back to two kernels.
MAX_FUSED_WIDTH = 16384


@dataclass
class QuantizedInput:
    """8-bit activations ready for a W8A8 linear: codes (T, K), scales (T, 1) or (1,), and the
    dtype the unquantized activations (and so the linear's output) have."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def add_rms_norm_quant_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                                 kind: str, input_scale: torch.Tensor | None = None
                                 ) -> tuple[QuantizedInput, torch.Tensor]:
    out, summed = add_rms_norm_reference(x, residual, weight, eps)
    codes, scale = quantize_activation(out, kind, input_scale)
    return QuantizedInput(codes, scale, out.dtype), summed


def silu_and_mul_quant_reference(gate: torch.Tensor, up: torch.Tensor, kind: str,
                                 input_scale: torch.Tensor | None = None) -> QuantizedInput:
    out = silu_and_mul_reference(gate, up)
    codes, scale = quantize_activation(out, kind, input_scale)
    return QuantizedInput(codes, scale, out.dtype)


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, kind: str,
                       input_scale: torch.Tensor | None = None) -> tuple[QuantizedInput, torch.Tensor]:
    """(8-bit RMSNorm(x + residual) * weight, x + residual) for x (T, N)."""
    if use_triton(x) and x.shape[-1] <= MAX_FUSED_WIDTH:
        from quantkit.kernels.quant_fused_triton import add_rms_norm_quant_triton

        return add_rms_norm_quant_triton(x, residual, weight, eps, kind, input_scale)
    return add_rms_norm_quant_reference(x, residual, weight, eps, kind, input_scale)


def silu_and_mul_quant(gate: torch.Tensor, up: torch.Tensor, kind: str,
                       input_scale: torch.Tensor | None = None) -> QuantizedInput:
    """8-bit ``silu(gate) * up`` for (T, N) operands."""
    if use_triton(gate) and gate.shape[-1] <= MAX_FUSED_WIDTH:
        from quantkit.kernels.quant_fused_triton import silu_and_mul_quant_triton

        return silu_and_mul_quant_triton(gate, up, kind, input_scale)
    return silu_and_mul_quant_reference(gate, up, kind, input_scale)
