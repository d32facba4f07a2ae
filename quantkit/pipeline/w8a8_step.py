"""SmoothQuant and W8A8 / FP8 for one decoder layer.

SmoothQuant: one pass over the calibration batches collects ``max|x|`` per input channel of every
group a norm produces (and, for the α search, a sample of the rows); each group's smoothing
scales are folded into its norm and its linears before anything is quantized.

W8A8: every linear the step does not ignore gets 8-bit weights (round to nearest, one scale per
output channel or per tensor). With static activations one more pass collects each group's input
``max|x|`` (after smoothing) and fixes the group's per-tensor input scale. Where calibration data
flows through the pipeline, the quantized linears also round their inputs as the checkpoint's
layers will (a forward pre-hook until the layer is done), so the next layer calibrates on the
activations of the quantized model.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.models.folding import fold_input_scales
from quantkit.pipeline.context import LayerContext
from quantkit.quant.smoothquant import ChannelAbsMax, search_alpha, smoothing_scales
from quantkit.quant.w8a8 import (
    EightBitWeight,
    fake_quantize_activation,
    quantize_weight,
    scale_from_absmax,
)
from quantkit.quant.weights import set_weight_out_in, weight_out_in
from quantkit.recipe_w8a8 import EightBitStep, SmoothQuantStep


def smooth_layer(ctx: LayerContext, step: SmoothQuantStep, quant: EightBitStep) -> dict[str, float]:
    """Fold SmoothQuant scales into every norm-fed group; returns the α used per group."""
    groups = [group for group in ctx.groups() if group.prev_kind == "norm" and ctx.targets(group)]
    if not groups:
        return {}
    rows = -(-step.max_tokens // max(1, len(ctx.batches or []))) if step.alpha_search else 0
    stats = ctx.collect_group_inputs(
        groups, lambda width, device: ChannelAbsMax(width, device=device, rows_per_batch=rows))
    chosen = {}
    for group in groups:
        weights = [weight_out_in(module).float() for _name, module in ctx.targets(group)]
        if step.alpha_search:
            alpha, scales, _errors = search_alpha(stats[group.name], weights, quant.type, quant.weight_strategy,
                                                  quant.activations, step.alpha_grid, ctx.data_parallel)
        else:
            alpha, scales = step.alpha, smoothing_scales(stats[group.name].absmax, weights, step.alpha)
        fold_input_scales(ctx.layer, group, scales, ctx.adapter)
        chosen[ctx.full_name(group.name)] = alpha
    return chosen


def quantize_layer_w8a8(ctx: LayerContext, step: EightBitStep) -> None:
    groups = [group for group in ctx.groups() if ctx.targets(group)]
    input_scales: dict[str, torch.Tensor] = {}
    if step.activations == "static":
        stats = ctx.collect_group_inputs(groups, lambda width, device: ChannelAbsMax(width, device=device))
        for group in groups:
            input_scales[group.name] = scale_from_absmax(stats[group.name].absmax.amax().reshape(1), step.type)
    for group in groups:
        for name, module in ctx.targets(group):
            weight = weight_out_in(module)
            record = quantize_weight(weight.float(), step.type, step.weight_strategy, step.activations,
                                     input_scales.get(group.name))
            _record(ctx, name, module, weight, record)
            if ctx.batches and step.activations != "none":
                handle = module.register_forward_pre_hook(_activation_rounding(step.type, input_scales.get(group.name)))
                ctx.cleanups.append(handle.remove)


def _record(ctx: LayerContext, name: str, module: nn.Module, original: torch.Tensor, record: EightBitWeight) -> None:
    represented = record.dequantize()
    diff = torch.linalg.norm(original.float() - represented)
    ctx.report.errors[name] = (diff / torch.linalg.norm(original.float()).clamp_min(1e-12)).item()
    set_weight_out_in(module, represented.to(original.dtype))
    ctx.result.keep(name, record.cpu)


def _activation_rounding(kind: str, input_scale: torch.Tensor | None):
    def hook(_module, inputs):
        return (fake_quantize_activation(inputs[0], kind, input_scale), *inputs[1:])

    return hook
