"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales, then weight-range clipping.

Quantization error hurts most on input channels with large activations. AWQ multiplies a linear
group's input channels by ``s`` before rounding (``Q(W·s)``) and divides the group's input by
``s`` (folded into the module that produces it, see ``quantkit.models.folding``), so salient
channels get finer effective steps. ``s`` comes from a one-parameter family searched on the
calibration data, as AutoAWQ does: ``s = x̄^α`` (``x̄`` the mean |activation| per channel) or, with
"duo scaling", ``s = x̄^α / w̄^(1-α)`` (``w̄`` the mean per-group-normalised |weight| per channel),
for α in ``{0, 1/grid, ..., (grid-1)/grid}``, normalised by ``sqrt(max(s) · min(s))``.

How the pipeline uses these functions, per decoder layer: capture each group's input ``x`` from
the float layer; ``awq_search_scales`` for every foldable group; fold every group's scales
(``fold_input_scales``) before quantizing any linear, since one group's scales rewrite another
group's weights (the MLP output group folds into ``up_proj``); then per linear,
``awq_search_clip`` with the folded input ``x / s`` and the folded weight, and ``awq_quantize``.

Differences from AutoAWQ:

* errors are measured on every calibration token through ``XᵀX`` (``awq_error``: one
  out × in × in product per candidate, whatever the token count), not on a subsample; the clip
  search likewise uses every token (AutoAWQ keeps 512). ``output_fn`` still allows AutoAWQ's
  whole-module loss (attention block, MLP) on ``max_tokens`` rows;
* candidates are quantized exactly as they will be stored (zero points >= 1, fp16 scales);
* ``s = 1`` is always a candidate, so the result never loses to RTN on the search data;
* asymmetric clipping shrinks each end of a group's own range (see ``awq_clip``).

Defaults, chosen on the bundled 8-layer target (64 × 512 calibration tokens, w4/w3 g128, both
symmetries): on small models without strong outlier channels the scales alone cut each
group's output error by only 3-10 %, clipping by 15-40 %, so clipping is on. Activation-only
scales (``duo_scaling=False``) gave a lower KL to the float model than duo scaling at 3 bits and
tied at 4; scoring α with clipping inside (``clip_in_scale_search``) tied on KL and costs about
20 clip searches per α, so it is an option, off by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.activation_stats import ActivationStats
from quantkit.quant.awq_clip import (
    fake_quantize_clipped,
    quantize_clipped,
    search_clip_ranges,
)
from quantkit.quant.awq_error import (
    diagonal_blocks,
    gram_blocks,
    output_error,
    row_chunks,
    scale_blocks,
    subsample_rows,
)
from quantkit.quant.qdq import fake_quantize
from quantkit.quant.rtn import QuantizedWeight, rtn_quantize
from quantkit.quant.scheme import QuantScheme, check_group_size

# (inputs (tokens, in), each linear's represented weight (out, in)) -> the output to compare.
OutputFn = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]

# Scores a candidate given as a function from a slice of output rows to those rows as represented.
Scorer = Callable[[Callable[[slice], torch.Tensor]], torch.Tensor]
# Relative floor of x̄ and w̄, so dead channels get a small finite scale rather than 0 or inf.
_FLOOR = 1e-4


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's knobs; grid, clip ratios and max_shrink default to AutoAWQ's values."""

    grid: int = 20  # α in {0, 1/grid, ..., (grid-1)/grid}
    clip: bool = True  # search clipped weight ranges after scaling
    clip_grid: int = 20  # shrink ratios evenly spaced from 1.0 down to 1 - clip_max_shrink
    clip_max_shrink: float = 0.5
    max_tokens: int = 4096  # rows of x that output_fn sees (the default loss uses every row)
    duo_scaling: bool = False  # s = x̄^α / w̄^(1-α) instead of s = x̄^α
    clip_in_scale_search: bool = False  # score each α with the clipping that will follow it

    def __post_init__(self) -> None:
        for name in ("grid", "clip_grid", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuantkitError(f"AWQ {name} must be a positive integer, got {value!r}")
        shrink = self.clip_max_shrink
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 <= shrink < 1:
            raise QuantkitError(
                f"AWQ clip_max_shrink must be a number in [0, 1), got {shrink!r}; 0.5 is the usual value"
            )
        for name in ("clip", "duo_scaling", "clip_in_scale_search"):
            if not isinstance(getattr(self, name), bool):
                raise QuantkitError(f"AWQ {name} must be true or false, got {getattr(self, name)!r}")

    def alphas(self) -> list[float]:
        return [i / self.grid for i in range(self.grid)]

    def clip_ratios(self) -> torch.Tensor:
        """Shrink ratios, 1.0 first."""
        return torch.linspace(1.0, 1.0 - self.clip_max_shrink, self.clip_grid)


def awq_search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scheme: QuantScheme,
    config: AWQConfig = AWQConfig(),
    *,
    output_fn: OutputFn | None = None,
) -> tuple[torch.Tensor, dict]:
    """Per-input-channel scales ``s`` (in,) > 0 for a group of linears that read ``x`` (tokens, in).

    Minimises ``Σ_linears ||x Wᵀ - (x / s) Q(W·s)ᵀ||²`` over the candidates, ``Q`` being the
    quantization that will be stored: zero points >= 1, fp16 scales and, when ``config.clip`` and
    ``config.clip_in_scale_search``, the clipped ranges ``awq_search_clip`` will then choose. With
    ``output_fn`` the error is that of ``output_fn(x, [Q(W·s) / s, ...])`` against
    ``output_fn(x, weights)`` instead, on ``x``'s rows (a seeded subsample of ``max_tokens`` rows
    when there are more: an ``output_fn`` that needs whole sequences, like attention, must be
    given at most ``max_tokens`` rows). ``s = 1`` is always a candidate, so the chosen error is never above the
    unscaled one (``error_unscaled``), which without clipping is plain RTN's (``error_rtn``).

    Returns ``s`` on ``x``'s device and a report: ``alpha`` (0.0 when ``s = 1`` won), ``scaled``
    (False when ``s = 1`` won), and the mean squared output error per element ``error`` (chosen),
    ``error_unscaled`` (``s = 1``, same quantizer) and ``error_rtn`` (``s = 1``, plain RTN).
    """
    _check_shapes(x, weights)
    x = x.float()
    score = None
    if output_fn is not None:
        stacked = torch.cat([w.detach().float().to(x.device) for w in weights])
        score = _output_fn_scorer(x, stacked, [w.shape[0] for w in weights], config, output_fn)
    return _search_scales(ActivationStats.of(x), weights, scheme, config, score)


def awq_search_scales_from_stats(
    stats: ActivationStats, weights: Sequence[torch.Tensor], scheme: QuantScheme, config: AWQConfig = AWQConfig()
) -> tuple[torch.Tensor, dict]:
    """``awq_search_scales`` from accumulated input statistics instead of the inputs themselves
    (what the pipeline uses: nothing but two sums is kept per group, over every token)."""
    _check_widths(stats.in_features, weights)
    return _search_scales(stats, weights, scheme, config, None)


def _search_scales(
    stats: ActivationStats,
    weights: Sequence[torch.Tensor],
    scheme: QuantScheme,
    config: AWQConfig,
    score: Scorer | None,
) -> tuple[torch.Tensor, dict]:
    check_group_size(stats.in_features, scheme.group_size, "<weight>")
    hessian = stats.gram
    stacked = torch.cat([w.detach().float().to(hessian.device) for w in weights])
    if score is None:
        score = _gram_scorer(stacked, hessian, stats.tokens)
    represent = _representer(stacked, hessian, scheme, config)
    candidates = _candidates(stats.abs_mean, stacked, scheme, config)
    errors = torch.stack([score(lambda rows, s=scales: represent(s, rows)) for scales in candidates]).tolist()
    best = min(range(len(errors)), key=errors.__getitem__)  # ties keep s = 1
    report = {
        "alpha": 0.0 if best == 0 else config.alphas()[best - 1],
        "scaled": best != 0,
        "error": errors[best],
        "error_unscaled": errors[0],
        "error_rtn": errors[0],
    }
    if _clips_in_search(config):
        plain = lambda rows: fake_quantize(stacked[rows], scheme, min_zero=1, fp16_scales=True)
        report["error_rtn"] = score(plain).item()
    return candidates[best].clone(), report


def awq_search_clip(
    x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, config: AWQConfig = AWQConfig()
) -> torch.Tensor:
    """Clipped range (out, n_groups, 2) = [low, high] per group of ``weight`` (out, in).

    ``x`` (tokens, in) is the input the layer will see once scales are folded (the captured input
    divided by the group's scales) and ``weight`` the folded weight. Each group keeps the
    shrink ratio (1.0 included) with the least error of its own output ``x_g W_gᵀ``.
    """
    _check_shapes(x, [weight])
    check_group_size(weight.shape[1], scheme.group_size, "<weight>")
    blocks = gram_blocks(x.float().to(weight.device), scheme.group_size)
    return search_clip_ranges(weight, blocks, scheme, config.clip_ratios().tolist())


def awq_search_clip_from_stats(
    stats: ActivationStats,
    weight: torch.Tensor,
    scheme: QuantScheme,
    config: AWQConfig = AWQConfig(),
    *,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``awq_search_clip`` from the statistics of the captured input; with ``scales`` the
    input the layer will see is taken to be ``x / scales`` (the group's folded scales)."""
    _check_widths(stats.in_features, [weight])
    check_group_size(weight.shape[1], scheme.group_size, "<weight>")
    blocks = diagonal_blocks(stats.gram.to(weight.device), scheme.group_size)
    if scales is not None:
        blocks = scale_blocks(blocks, scales.to(weight.device).float())
    return search_clip_ranges(weight, blocks, scheme, config.clip_ratios().tolist())


def awq_quantize(
    weight: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None, *, module_name: str
) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) on the grids of the ``clip`` ranges (RTN when ``clip`` is None).

    Zero points are >= 1 and scales fp16-representable (GPTQ v1 storable), as ``rtn_quantize``.
    """
    if clip is None:
        return rtn_quantize(weight.detach().float(), scheme, module_name=module_name)
    return quantize_clipped(weight, scheme, clip, module_name)


def _clips_in_search(config: AWQConfig) -> bool:
    return config.clip and config.clip_in_scale_search


def _candidates(
    abs_mean: torch.Tensor, stacked: torch.Tensor, scheme: QuantScheme, config: AWQConfig
) -> torch.Tensor:
    """Candidate scales (1 + grid, in): ``s = 1`` first, then one row per α."""
    x_mean = _relative(abs_mean.to(stacked.device))
    alphas = torch.tensor(config.alphas(), device=stacked.device).unsqueeze(1)
    scales = x_mean.pow(alphas)
    if config.duo_scaling:
        scales = scales / _relative(_weight_magnitude(stacked, scheme.group_size)).pow(1.0 - alphas)
    scales = scales.clamp_min(_FLOOR)
    scales = scales / (scales.amax(1, keepdim=True) * scales.amin(1, keepdim=True)).sqrt()
    return torch.cat([torch.ones_like(x_mean).unsqueeze(0), scales])


def _representer(
    stacked: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, config: AWQConfig
) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    """A function from scales ``s`` and a slice of output rows to those rows of the weights the
    layer will represent, ``Q(W·s) / s`` (rows quantize independently)."""
    if not _clips_in_search(config):
        return lambda scales, rows: fake_quantize(stacked[rows] * scales, scheme, min_zero=1, fp16_scales=True) / scales
    blocks = diagonal_blocks(hessian, scheme.group_size)
    ratios = config.clip_ratios().tolist()

    def represent(scales: torch.Tensor, rows: slice) -> torch.Tensor:
        scaled = stacked[rows] * scales
        ranges = search_clip_ranges(scaled, scale_blocks(blocks, scales), scheme, ratios)
        return fake_quantize_clipped(scaled, ranges, scheme) / scales

    return represent


def _gram_scorer(stacked: torch.Tensor, hessian: torch.Tensor, tokens: int) -> Scorer:
    """Mean squared output error per element over every token, through ``XᵀX``, a block of
    output rows at a time so temporaries stay small beside the weight."""
    chunks = row_chunks(stacked.shape[0], stacked.shape[1])
    elements = tokens * stacked.shape[0]

    def score(represented: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=stacked.device)
        for rows in chunks:
            total += output_error(stacked[rows] - represented(rows), hessian)
        return total / elements

    return score


def _output_fn_scorer(
    x: torch.Tensor, stacked: torch.Tensor, rows: list[int], config: AWQConfig, output_fn: OutputFn
) -> Scorer:
    """``output_fn``'s mean squared error of the represented weights (0-d tensor)."""
    sample = subsample_rows(x, config.max_tokens)
    reference = output_fn(sample, list(stacked.split(rows))).float()

    def score(represented: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        weights = list(represented(slice(None)).split(rows))
        return (output_fn(sample, weights).float() - reference).pow(2).mean()

    return score


def _weight_magnitude(stacked: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| of its group, per input channel (AutoAWQ's w̄)."""
    size = stacked.shape[1] if group_size == -1 else group_size
    groups = stacked.abs().reshape(stacked.shape[0], -1, size)
    normalised = groups / groups.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return normalised.reshape(stacked.shape).mean(0)


def _relative(values: torch.Tensor) -> torch.Tensor:
    """``values / max(values)``, floored: the scale family is invariant to a common factor."""
    return (values / values.max().clamp_min(torch.finfo(torch.float32).tiny)).clamp_min(_FLOOR)


def _check_shapes(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"AWQ expects inputs shaped (tokens, in), got {tuple(x.shape)}")
    _check_widths(x.shape[1], weights)


def _check_widths(in_features: int, weights: Sequence[torch.Tensor]) -> None:
    if not weights:
        raise ValueError("AWQ needs at least one weight")
    for weight in weights:
        if weight.dim() != 2 or weight.shape[1] != in_features:
            raise ValueError(
                f"weight shaped {tuple(weight.shape)} does not read inputs of {in_features} channels"
            )
