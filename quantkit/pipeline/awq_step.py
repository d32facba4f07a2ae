"""AWQ for one decoder layer: search per-channel scales on the float layer's inputs, fold them,
then quantize every linear on a clipped grid.

One pass over the calibration batches accumulates each group's input statistics (``XᵀX`` and
the mean |x| per channel, over every token: all the searches need, see
``quant/activation_stats.py``). All groups' scales are searched before any is folded, because
folding one group rewrites another group's weights (the MLP output group folds into
``up_proj``); then each linear's clipping range is searched for the folded input ``x / s`` and
the folded weight.
"""

from __future__ import annotations

from quantkit.models.folding import fold_input_scales
from quantkit.pipeline.context import LayerContext
from quantkit.quant.activation_stats import ActivationStats
from quantkit.quant.awq import (
    AWQConfig,
    awq_quantize,
    awq_search_clip_from_stats,
    awq_search_scales_from_stats,
)
from quantkit.quant.weights import weight_out_in

FOLDABLE = ("norm", "linear", "linear_slice")


def quantize_layer_awq(ctx: LayerContext, config: AWQConfig) -> None:
    groups = [group for group in ctx.groups() if ctx.targets(group)]
    stats = _collect_input_stats(ctx, groups)
    scales = {}
    for group in groups:
        if group.prev_kind not in FOLDABLE:
            continue
        weights = [weight_out_in(module) for _name, module in ctx.targets(group)]
        found, report = awq_search_scales_from_stats(stats[group.name], weights, ctx.scheme, config)
        if report["scaled"]:
            scales[group.name] = found
    for group in groups:
        if group.name in scales:
            fold_input_scales(ctx.layer, group, scales[group.name], ctx.adapter)
    for group in groups:
        group_stats = stats.pop(group.name)
        for name, module in ctx.targets(group):
            weight = weight_out_in(module).float()
            clip = (awq_search_clip_from_stats(group_stats, weight, ctx.scheme, config, scales=scales.get(group.name))
                    if config.clip else None)
            ctx.record(name, module, awq_quantize(weight, ctx.scheme, clip, module_name=name), reference=weight)


def _collect_input_stats(ctx: LayerContext, groups) -> dict[str, ActivationStats]:
    return ctx.collect_group_inputs(groups, lambda width, device: ActivationStats(width, device=device))
