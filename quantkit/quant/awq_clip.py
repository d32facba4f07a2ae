"""AWQ's weight-range clipping: per group, shrink the quantization range where that lowers output error.

A group's range is ``[low, high]`` per output row and input group, shaped (out, n_groups, 2).
Quantizing with a range takes the scale and zero point that RTN would take for a group whose
smallest and largest weights were ``low`` and ``high`` (``compute_qparams``' conventions exactly:
zero points >= ``min_zero``, fp16-representable scales), and weights outside the range are
clamped to the end codes. The unclipped range reproduces RTN bit for bit.

The search follows AutoAWQ's ``auto_clip`` (shrink ratios from 1.0 down to ``1 - max_shrink``,
each group keeps the ratio with the least error of its own output ``x_g W_gᵀ``) with two changes:
the error is measured on every calibration token through the Gram matrix, and asymmetric groups
shrink both ends of their own range (as the GPTQ reference's MSE grid does) rather than clamping
to a symmetric ``[-r·max|w|, r·max|w|]``.
"""

from __future__ import annotations

import torch

from quantkit.quant.awq_error import group_output_errors, row_chunks
from quantkit.quant.qdq import compute_qparams, max_code
from quantkit.quant.rtn import QuantizedWeight, quantize_on_grid
from quantkit.quant.scheme import QuantScheme, check_group_size


def full_ranges(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The unclipped range (out, n_groups, 2) of each group: [min, max], or [-max|w|, max|w|] if symmetric."""
    groups = _grouped(weight.float(), scheme.group_size)
    if scheme.symmetric:
        top = groups.abs().amax(-1)
        return torch.stack([-top, top], dim=-1)
    return torch.stack([groups.amin(-1), groups.amax(-1)], dim=-1)


def range_qparams(
    ranges: torch.Tensor, scheme: QuantScheme, *, min_zero: int = 1, fp16_scales: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros (out, n_groups) that RTN would give groups whose extremes are ``ranges``."""
    # A two-column group [low, high] has exactly those extremes, so qdq's own rules apply unchanged.
    ends = ranges.float().reshape(ranges.shape[0], -1)
    return compute_qparams(
        ends, scheme.bits, 2, scheme.symmetric, min_zero=min_zero, fp16_scales=fp16_scales
    )


def fake_quantize_clipped(weight: torch.Tensor, ranges: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``weight`` (out, in) float32 rounded onto the grids of ``ranges``, as ``awq_quantize`` stores it.

    Equal, bit for bit, to ``dequantize(quantize(...))`` with the same parameters, in fewer passes
    (the searches call it hundreds of times): ``clamp(round(w / scale), -zero, maxq - zero) * scale``.
    """
    scales, zeros = range_qparams(ranges, scheme)
    groups = _grouped(weight.float(), scheme.group_size)
    step = scales.unsqueeze(-1)
    low = -zeros.to(torch.float32).unsqueeze(-1)
    steps = torch.round(groups / step).clamp_(min=low, max=low + max_code(scheme.bits))
    return (steps * step).reshape(weight.shape)


def search_clip_ranges(
    weight: torch.Tensor, blocks: torch.Tensor, scheme: QuantScheme, ratios: list[float]
) -> torch.Tensor:
    """Per group, the range ``ratio · full range`` (out, n_groups, 2) with the least output error.

    ``blocks`` are the diagonal blocks of the inputs' Gram matrix (``gram_blocks``). ``ratios``
    must start with 1.0, so a group is clipped only when clipping strictly helps.
    """
    weight = weight.float()
    full = full_ranges(weight, scheme)
    best = torch.ones(full.shape[:2], device=weight.device)
    for rows in row_chunks(weight.shape[0], weight.shape[1]):
        best[rows] = _best_ratios(weight[rows], full[rows], blocks, scheme, ratios)
    return full * best.unsqueeze(-1)


def quantize_clipped(
    weight: torch.Tensor, scheme: QuantScheme, ranges: torch.Tensor, module_name: str
) -> QuantizedWeight:
    """The ``QuantizedWeight`` of ``weight`` (out, in) on the grids of ``ranges`` (out, n_groups, 2)."""
    weight = weight.detach().float()
    check_group_size(weight.shape[1], scheme.group_size, module_name)
    n_groups = 1 if scheme.group_size == -1 else weight.shape[1] // scheme.group_size
    if tuple(ranges.shape) != (weight.shape[0], n_groups, 2):
        raise ValueError(
            f"clip ranges of '{module_name}' have shape {tuple(ranges.shape)}, expected "
            f"{(weight.shape[0], n_groups, 2)} (out, n_groups, [low, high])"
        )
    scales, zeros = range_qparams(ranges.to(weight.device), scheme)
    return quantize_on_grid(weight, scales, zeros, scheme)


def _best_ratios(
    weight: torch.Tensor,
    full: torch.Tensor,
    blocks: torch.Tensor,
    scheme: QuantScheme,
    ratios: list[float],
) -> torch.Tensor:
    best_error = torch.full(full.shape[:2], torch.inf, device=weight.device)
    best_ratio = torch.ones_like(best_error)
    for ratio in ratios:
        delta = weight - fake_quantize_clipped(weight, full * ratio, scheme)
        error = group_output_errors(delta, blocks)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    size = weight.shape[1] if group_size == -1 else group_size
    return weight.reshape(weight.shape[0], -1, size)
