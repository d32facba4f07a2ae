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

from quantkit.quant.awq_error import group_output_errors
from quantkit.quant.qdq import compute_qparams, max_code
from quantkit.quant.rtn import QuantizedWeight, quantize_on_grid
from quantkit.quant.scheme import QuantScheme, check_group_size

# The search scores every ratio at once, on batches of rows holding (ratios × rows × in) values.
# On accelerators it is launch-bound, so batches are big (64 MiB a temporary). On the CPU every
# pass over memory costs, so batches stay in cache (1 MiB a temporary), though never below 128
# candidate rows: the error's (rows, size) @ (size, size) products slow down below that.
_BATCH_ELEMENTS = 1 << 24
_CPU_BATCH_ELEMENTS = 1 << 18
_CPU_MIN_BATCH_ROWS = 128


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
    groups = _grouped(weight.float(), scheme.group_size)
    return _on_grids(groups, ranges, scheme).reshape(weight.shape)


def search_clip_ranges(
    weight: torch.Tensor, blocks: torch.Tensor, scheme: QuantScheme, ratios: list[float]
) -> torch.Tensor:
    """Per group, the range ``ratio · full range`` (out, n_groups, 2) with the least output error.

    ``blocks`` are the diagonal blocks of the inputs' Gram matrix (``gram_blocks``). ``ratios``
    must start with 1.0, so a group is clipped only when clipping strictly helps.
    """
    weight = weight.float()
    full = full_ranges(weight, scheme)
    candidates = torch.tensor(ratios, dtype=torch.float32, device=weight.device)
    best = torch.ones(full.shape[:2], device=weight.device)
    for rows in _row_batches(weight.shape[0], weight.shape[1], len(ratios), weight.device):
        best[rows] = _best_ratios(weight[rows], full[rows], blocks, scheme, candidates)
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
    candidates: torch.Tensor,
) -> torch.Tensor:
    """Per (row, group), the first of ``candidates`` (R,) float32 with the least output error.

    All ratios are scored in one batch of tensor operations rather than one small round per
    ratio (the search is launch-bound on GPUs). Each candidate goes through exactly the
    arithmetic of quantizing alone, so the choice is the one-ratio-at-a-time loop's bit for bit:
    that loop kept a ratio only when strictly better, i.e. the first minimum, which ``argmin``
    returns; it never kept a NaN error, so NaNs count as infinite here; and it fell back to 1.0
    where no error was below infinity, which is the first ratio.
    """
    ranges = full * candidates.reshape(-1, 1, 1, 1)  # (R, rows, n_groups, 2)
    groups = _grouped(weight, scheme.group_size)
    rounded = _on_grids(groups, ranges, scheme)  # (R, rows, n_groups, size)
    deltas = torch.sub(groups, rounded, out=rounded).reshape(-1, weight.shape[1])
    errors = group_output_errors(deltas, blocks).reshape(len(candidates), *full.shape[:2])
    errors.masked_fill_(errors.isnan(), torch.inf)
    return candidates[errors.argmin(dim=0)]


def _row_batches(rows: int, in_features: int, count: int, device: torch.device) -> list[slice]:
    """Slices of ``rows`` whose ``count`` candidates each are scored in one batch."""
    per_row = count * max(in_features, 1)
    if device.type == "cpu":
        step = max(_CPU_BATCH_ELEMENTS // per_row, -(-_CPU_MIN_BATCH_ROWS // count))
    else:
        step = max(1, _BATCH_ELEMENTS // per_row)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _on_grids(groups: torch.Tensor, ranges: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``groups`` (out, n_groups, size) rounded onto the grids of ``ranges`` (..., out, n_groups, 2),
    one result per leading index: ``clamp(round(w / scale), -zero, maxq - zero) * scale``."""
    scales, zeros = range_qparams(ranges.reshape(-1, *ranges.shape[-2:]), scheme)
    step = scales.reshape(ranges.shape[:-1]).unsqueeze(-1)
    low = -zeros.to(torch.float32).reshape(ranges.shape[:-1]).unsqueeze(-1)
    steps = torch.div(groups, step).round_().clamp_(min=low, max=low + max_code(scheme.bits))
    return steps.mul_(step)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    size = weight.shape[1] if group_size == -1 else group_size
    return weight.reshape(weight.shape[0], -1, size)
