"""Quantize-dequantize math for group-wise integer weights, vectorised over groups.

Weights are shaped (out, in); a group is ``group_size`` consecutive input columns of one output
row (group_size -1: the whole row). Conventions follow the GPTQ reference code
(IST-DASLab/gptq, ``quant.py``):

* ``maxq = 2**bits - 1``; codes are integers in ``[0, maxq]``.
* asymmetric: ``xmin = min(w.min(), 0)``, ``xmax = max(w.max(), 0)``,
  ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``.
* symmetric: ``xmax = max(|w.min()|, |w.max()|)``, ``scale = 2 * xmax / maxq``,
  ``zero = (maxq + 1) / 2`` (8 for 4-bit).
* ``q = clamp(round(w / scale) + zero, 0, maxq)`` and ``w_hat = scale * (q - zero)``.
* an all-zero group uses ``[-1, 1]`` as its range, so no scale is ever 0, NaN or inf.
* unlike the reference code, a symmetric group with no negative weight still spans
  ``[-xmax, xmax]`` (the reference then uses ``scale = xmax / maxq`` with ``zero = (maxq + 1) / 2``
  and clips the top half of the group's values).

``min_zero`` exists for the GPTQ v1 checkpoint layout, which stores ``zero - 1`` in ``bits``
bits and so cannot hold an asymmetric zero point of 0. With ``min_zero=1`` a group whose zero
would round below 1 gets ``zero = 1`` and a scale recomputed so that the grid still spans
``[xmin, xmax]`` (the scale grows by about ``maxq / (maxq - 1)`` for those groups only).
``fp16_scales`` rounds scales to values a float16 can hold (still returned as float32), so codes
are chosen against the scales that a checkpoint with fp16 scales actually stores.
"""

from __future__ import annotations

import torch

from quantkit.quant.scheme import QuantScheme, check_group_size

_FP16_MAX = 65504.0
_FP16_SMALLEST = 2.0**-24  # smallest positive (subnormal) float16


def max_code(bits: int) -> int:
    """Largest code of a ``bits``-bit unsigned integer: ``2**bits - 1``."""
    return (1 << bits) - 1


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    *,
    min_zero: int = 0,
    fp16_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (out, n_groups) float32 and zero points (out, n_groups) int32 for ``w`` (out, in)."""
    maxq = max_code(bits)
    if not 0 <= min_zero < maxq:
        raise ValueError(
            f"min_zero must be in [0, {maxq - 1}] for {bits}-bit codes, got {min_zero}"
        )
    groups = _grouped(w, group_size)
    if symmetric:
        scales, zeros = _symmetric_params(groups, maxq)
    else:
        scales, zeros = _asymmetric_params(groups, maxq, min_zero)
    if fp16_scales:
        scales = (
            scales.to(torch.float16).to(torch.float32).clamp(_FP16_SMALLEST, _FP16_MAX)
        )
    return scales, zeros


def quantize(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Integer codes (out, in) int32 in ``[0, 2**bits - 1]`` for ``w`` under the given params."""
    groups = _grouped(w, group_size)
    q = torch.round(groups / scales.unsqueeze(-1)) + zeros.unsqueeze(-1).to(
        torch.float32
    )
    q = q.clamp_(0, max_code(bits))
    return q.reshape(w.shape).to(torch.int32)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Float32 weights (out, in): ``scale * (q - zero)`` per group."""
    groups = _grouped(codes, group_size, as_float=False)
    shifted = (groups.to(torch.int32) - zeros.to(torch.int32).unsqueeze(-1)).to(
        torch.float32
    )
    return (scales.to(torch.float32).unsqueeze(-1) * shifted).reshape(codes.shape)


def fake_quantize(
    w: torch.Tensor, scheme: QuantScheme, *, min_zero: int = 1, fp16_scales: bool = True
) -> torch.Tensor:
    """Round-trip ``w`` (out, in) through the scheme's integer grid; same dtype as ``w``.

    The defaults match what a GPTQ v1 checkpoint (fp16 scales, zero points >= 1) reconstructs.
    """
    scales, zeros = compute_qparams(
        w,
        scheme.bits,
        scheme.group_size,
        scheme.symmetric,
        min_zero=min_zero,
        fp16_scales=fp16_scales,
    )
    codes = quantize(w, scales, zeros, scheme.bits, scheme.group_size)
    return dequantize(codes, scales, zeros, scheme.group_size).to(w.dtype)


def _grouped(
    w: torch.Tensor, group_size: int, *, as_float: bool = True
) -> torch.Tensor:
    """View (out, in) as (out, n_groups, group_size)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    check_group_size(in_features, group_size, "<weight>")
    size = in_features if group_size == -1 else group_size
    grouped = w.reshape(out_features, in_features // size, size)
    return grouped.to(torch.float32) if as_float else grouped


def _symmetric_params(
    groups: torch.Tensor, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    xmax = groups.abs().amax(dim=-1)
    xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
    scales = _positive(2 * xmax / maxq)
    zeros = torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int32)
    return scales, zeros


def _asymmetric_params(
    groups: torch.Tensor, maxq: int, min_zero: int
) -> tuple[torch.Tensor, torch.Tensor]:
    xmin = groups.amin(dim=-1).clamp(max=0)
    xmax = groups.amax(dim=-1).clamp(min=0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scales = _positive((xmax - xmin) / maxq)
    zeros = torch.round(-xmin / scales)
    if min_zero > 0:
        # Raise the zero point to min_zero and widen the step just enough that codes
        # [0, maxq] still reach both xmin (code 0) and xmax (code maxq).
        low = zeros < min_zero
        widened = torch.maximum(xmax / (maxq - min_zero), -xmin / min_zero)
        scales = torch.where(low, _positive(widened), scales)
        zeros = torch.where(low, torch.full_like(zeros, min_zero), zeros)
    return scales, zeros.clamp_(0, maxq).to(torch.int32)


def _positive(scales: torch.Tensor) -> torch.Tensor:
    # Denormal ranges could round a scale to 0; keep every scale a usable divisor.
    return scales.clamp_min(torch.finfo(torch.float32).tiny)


__all__ = [
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "max_code",
    "quantize",
]
